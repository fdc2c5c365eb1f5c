# The measurement of the base model and of each checkpoint: the activation capture of the fixed measurement set
# and the sampled EM answers, in one process per checkpoint (one start-up and one import of torch/transformers
# instead of two; the outputs are those `traitmon capture` and `traitmon answers` write). Either settings section
# changing reruns the job; the other output comes out the same (seeded sampling, deterministic capture).


rule measure_base:
    # expensive and reusable: shared between sweeps through SNAKEMAKE_OUTPUT_CACHE with --cache
    cache: "omit-software"
    input:
        model=f"{RES}/models/{{model}}",
    output:
        store=directory(f"{RES}/capture/{{model}}/base.zarr"),
        answers=f"{RES}/answers/{{model}}/base.jsonl",
    params:
        capture=capture_settings,
        answers=em_sampling_settings,
    log:
        f"{RES}/logs/measure/{{model}}/base.log",
    priority: 10  # the judge needs the base answers too
    threads: THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=GPU,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon measure --model-dir {input.model:q} --model-key {wildcards.model:q}"
        " --capture-settings {params.capture:q} --answer-settings {params.answers:q}"
        " --capture-out {output.store:q} --answers-out {output.answers:q} --step 0 --label base"
        " --threads {threads} > {log:q} 2>&1"


rule measure_checkpoint:
    # expensive and reusable: shared between sweeps through SNAKEMAKE_OUTPUT_CACHE with --cache
    cache: "omit-software"
    input:
        model=f"{RES}/models/{{model}}",
        adapter=f"{RES}/finetune/{{model}}/{{perturbation}}/checkpoint-{{step}}",
    output:
        store=directory(f"{RES}/capture/{{model}}/{{perturbation}}/step-{{step}}.zarr"),
        answers=f"{RES}/answers/{{model}}/{{perturbation}}/step-{{step}}.jsonl",
    params:
        capture=capture_settings,
        answers=em_sampling_settings,
    log:
        f"{RES}/logs/measure/{{model}}/{{perturbation}}/step-{{step}}.log",
    # the answers lead to the judge, the study's last long stage: start them as soon as an adapter exists
    priority: 10
    threads: THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=GPU,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon measure --model-dir {input.model:q} --model-key {wildcards.model:q} --adapter {input.adapter:q}"
        " --capture-settings {params.capture:q} --answer-settings {params.answers:q}"
        " --capture-out {output.store:q} --answers-out {output.answers:q}"
        " --perturbation {wildcards.perturbation:q} --step {wildcards.step:q} --threads {threads} > {log:q} 2>&1"
