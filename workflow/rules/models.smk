rule convert_model:
    # expensive and reusable: shared between sweeps through SNAKEMAKE_OUTPUT_CACHE with --cache
    cache: "omit-software"
    output:
        model=directory(f"{RES}/models/{{model}}"),
    params:
        source=model_source_json,
        dtype=model_dtype,
    log:
        f"{RES}/logs/models/{{model}}.log",
    threads: 1
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon convert --key {wildcards.model:q} --source {params.source:q} --dtype {params.dtype:q}"
        " --out {output.model:q} > {log:q} 2>&1"
