rule finetune:
    # expensive and reusable: shared between sweeps through SNAKEMAKE_OUTPUT_CACHE with --cache
    cache: "omit-software"
    input:
        model=f"{RES}/models/{{model}}",
        train=f"{RES}/data/{{model}}/{{perturbation}}/train.jsonl",
        heldout=f"{RES}/data/{{model}}/{{perturbation}}/heldout.jsonl",
        # a guarded run's monitor and bundle sources (finetune.guard); none for an unguarded run, whose inputs,
        # params and command are those of before guards existed. The guard travels in the settings blob.
        guard_monitor=guard_monitor,
        guard_directions=guard_directions,
    output:
        **finetune_checkpoint_dirs(),  # checkpoint_10=..., one named directory per configured step
        train_log=f"{RES}/finetune/{{model}}/{{perturbation}}/train_log.csv",
        eval_log=f"{RES}/finetune/{{model}}/{{perturbation}}/eval_log.csv",
        run=f"{RES}/finetune/{{model}}/{{perturbation}}/run.json",
    params:
        settings=finetune_settings,
        out=f"{RES}/finetune/{{model}}/{{perturbation}}",
    log:
        f"{RES}/logs/finetune/{{model}}/{{perturbation}}.log",
    # the adapters gate every later stage but the directions and screening: train them first
    priority: 20
    threads: THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=GPU,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon finetune --model-dir {input.model:q} --train {input.train:q} --heldout {input.heldout:q}"
        " --settings {params.settings:q} --out {params.out:q} --threads {threads} > {log:q} 2>&1"
