rule convert_model:
    output:
        model=directory(f"{RES}/models/{{model}}"),
    params:
        source=model_source_json,
    log:
        f"{RES}/logs/models/{{model}}.log",
    threads: 1
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon convert --key {wildcards.model} --source {params.source:q} --out {output.model} > {log} 2>&1"
