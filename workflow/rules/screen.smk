# Screening each perturbation's training set on the base model, before (and independent of) finetuning, and
# the cross-perturbation question: does the screening predict the run's final EM rate and dangerous label?


rule screen_perturbation:
    input:
        model=f"{RES}/models/{{model}}",
        directions=model_directions,
        data=f"{RES}/data/{{model}}/{{perturbation}}/train.jsonl",
    output:
        # base_answers.jsonl (the cached own answers) stays beside them, undeclared, so a rerun reuses it
        rows=f"{RES}/screen/{{model}}/{{perturbation}}/rows.csv",
        profile=f"{RES}/screen/{{model}}/{{perturbation}}/profile.json",
    params:
        out_dir=lambda wildcards, output: str(Path(output.profile).parent),
        # the base model's own answers are generated as the extraction's answers are
        max_new_tokens=config["directions"]["max_new_tokens"],
        temperature=config["directions"]["temperature"],
        seed=config["directions"]["seed"],
        batch_size=config["capture"]["batch_size"],
        max_length=config["finetune"]["max_length"],
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
        "traitmon screen {input.data:q} --model-dir {input.model:q} --directions {input.directions:q}"
        " --out-dir {params.out_dir:q} --batch-size {params.batch_size} --max-length {params.max_length}"
        " --max-new-tokens {params.max_new_tokens} --temperature {params.temperature} --seed {params.seed}"
        " --dtype {params.dtype:q} --model-key {wildcards.model:q} --perturbation {wildcards.perturbation:q}"
        " --threads {threads} > {log:q} 2>&1"


rule screen_analysis:
    input:
        profiles=expand(f"{RES}/screen/{{model}}/{{perturbation}}/profile.json", model=MODELS,
                        perturbation=PERTURBATIONS),
        drift=expand(f"{RES}/analysis/{{model}}/drift.csv", model=MODELS),
        predictions=f"{RES}/analysis/monitor/predictions.csv",
    output:
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
        "traitmon screen-analysis --profiles {input.profiles:q} --drift {input.drift:q}"
        " --predictions {input.predictions:q} --theta {params.theta} --target-fnr {params.target_fnr}"
        " --table {output.table:q} --lopo {output.lopo:q} --metrics {output.metrics:q}"
        " --figure {output.figure:q} > {log:q} 2>&1"
