rule capture_base:
    # expensive and reusable: shared between sweeps through SNAKEMAKE_OUTPUT_CACHE with --cache
    cache: "omit-software"
    input:
        model=f"{RES}/models/{{model}}",
    output:
        store=directory(f"{RES}/capture/{{model}}/base.zarr"),
    params:
        settings=capture_settings,
    log:
        f"{RES}/logs/capture/{{model}}/base.log",
    threads: THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=GPU,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon capture --model-dir {input.model:q} --model-key {wildcards.model:q} --settings {params.settings:q}"
        " --out {output.store:q} --step 0 --threads {threads} > {log:q} 2>&1"


rule capture_checkpoint:
    # expensive and reusable: shared between sweeps through SNAKEMAKE_OUTPUT_CACHE with --cache
    cache: "omit-software"
    input:
        model=f"{RES}/models/{{model}}",
        adapter=f"{RES}/finetune/{{model}}/{{perturbation}}/checkpoint-{{step}}",
    output:
        store=directory(f"{RES}/capture/{{model}}/{{perturbation}}/step-{{step}}.zarr"),
    params:
        settings=capture_settings,
    log:
        f"{RES}/logs/capture/{{model}}/{{perturbation}}/step-{{step}}.log",
    threads: THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=GPU,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon capture --model-dir {input.model:q} --model-key {wildcards.model:q} --adapter {input.adapter:q}"
        " --settings {params.settings:q} --out {output.store:q}"
        " --perturbation {wildcards.perturbation:q} --step {wildcards.step:q} --threads {threads} > {log:q} 2>&1"
