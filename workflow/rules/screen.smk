# Screening each perturbation's training set on the base model, before (and independent of) finetuning, and
# the cross-perturbation question: does the screening predict the run's final EM rate and dangerous label?
# The model work (own answers, teacher-forced activations) does not depend on the traits, so adding a trait reruns
# only screen_analysis, which projects every store on its model's directions.


rule screen_perturbation:
    input:
        model=f"{RES}/models/{{model}}",
        data=f"{RES}/data/{{model}}/{{perturbation}}/train.jsonl",
    output:
        # base_answers.jsonl (the cached own answers) stays beside it, undeclared, so a rerun reuses it
        activations=directory(f"{RES}/screen/{{model}}/{{perturbation}}/activations.zarr"),
    params:
        # the same layers as the captures, so every trait layer a capture can serve, a screening can too
        layers=screen_layers,
        # the base model's own answers are generated as the extraction's answers are
        max_new_tokens=config["directions"]["max_new_tokens"],
        temperature=config["directions"]["temperature"],
        seed=config["directions"]["seed"],
        batch_size=config["capture"]["batch_size"],
        max_length=config["finetune"]["max_length"],
        precision=config["capture"]["precision"],
        dtype=model_dtype,
    log:
        f"{RES}/logs/screen/{{model}}/{{perturbation}}.log",
    threads: THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=GPU,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon screen {input.data:q} --model-dir {input.model:q} --activations-out {output.activations:q}"
        " --layers {params.layers} --batch-size {params.batch_size} --max-length {params.max_length}"
        " --max-new-tokens {params.max_new_tokens} --temperature {params.temperature} --seed {params.seed}"
        " --dtype {params.dtype:q} --precision {params.precision:q} --model-key {wildcards.model:q} --perturbation {wildcards.perturbation:q}"
        " --threads {threads} > {log:q} 2>&1"


rule screen_analysis:
    input:
        activations=expand(f"{RES}/screen/{{model}}/{{perturbation}}/activations.zarr", model=MODELS,
                           perturbation=PERTURBATIONS),
        directions=expand(f"{RES}/directions/{{model}}/{{trait}}.zarr", model=MODELS, trait=TRAITS),
        drift=expand(f"{RES}/analysis/{{model}}/drift.csv", model=MODELS),
        predictions=f"{RES}/analysis/monitor/predictions.csv",
    output:
        rows=f"{RES}/analysis/screening/rows.csv",
        profiles=f"{RES}/analysis/screening/profiles.json",
        table=report(f"{RES}/analysis/screening/screening.csv", caption="../report/screening.rst",
                     category="Screening", labels={"what": "screening vs final EM"}),
        lopo=f"{RES}/analysis/screening/predictions.csv",
        metrics=f"{RES}/analysis/screening/metrics.json",
        figure=report(f"{RES}/analysis/figures/screening_vs_em.png", caption="../report/screening.rst",
                      category="Screening", labels={"figure": "screening vs final EM"}),
    params:
        theta=config["analysis"]["theta"],
        target_fnr=config["analysis"]["target_fnr"],
    log:
        f"{RES}/logs/analysis/screening.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon screen-analysis --activations {input.activations:q} --directions {input.directions:q}"
        " --drift {input.drift:q} --predictions {input.predictions:q} --theta {params.theta}"
        " --target-fnr {params.target_fnr} --rows-out {output.rows:q} --profiles-out {output.profiles:q}"
        " --table {output.table:q} --lopo {output.lopo:q} --metrics {output.metrics:q}"
        " --figure {output.figure:q} > {log:q} 2>&1"
