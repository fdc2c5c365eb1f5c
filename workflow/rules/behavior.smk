rule sample_trait_answers:
    # One job per model over every checkpoint (base loaded once, adapters applied in turn; a checkpoint's traits
    # in one batch). Each checkpoint's answers are cached: adding a perturbation samples only its checkpoints,
    # adding or removing a trait samples every checkpoint again (its batch changes).
    input:
        model=f"{RES}/models/{{model}}",
        adapters=model_adapters,
        traits=trait_files,
    output:
        answers=f"{RES}/answers/{{model}}/traits.jsonl",
    params:
        settings=trait_sampling_settings,
        runs=trait_answer_runs,
        cache=f"{RES}/cache/trait_answers/{{model}}",
    log:
        f"{RES}/logs/answers/{{model}}/traits.log",
    # the longest job once the adapters exist, and the judge waits for it: before the per-checkpoint jobs
    priority: 15
    threads: THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=GPU,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon trait-answers --model-dir {input.model:q} --model-key {wildcards.model:q}"
        " --trait-file {input.traits:q} --runs {params.runs:q} --settings {params.settings:q}"
        " --cache {params.cache:q} --out {output.answers:q} --threads {threads} > {log:q} 2>&1"


rule judge_runs:
    input:
        answers=model_answers,
        traits=trait_files,
    output:
        judged=f"{RES}/behavior/{{judge}}/{{model}}/judged.jsonl",
        table=f"{RES}/behavior/{{judge}}/{{model}}/em_scores.csv",
        figure=report(
            f"{RES}/behavior/{{judge}}/{{model}}/em_rate_over_steps.png",
            caption="../report/em_rate_over_steps.rst",
            category="Behaviour",
            subcategory="{model}",
        ),
    params:
        spec=judge_spec,
        settings=behavior_settings,
        kinds=lambda wildcards: json.dumps({p: spec["kind"] for p, spec in config["perturbations"].items()}),
        # a folder of per-job append-only shards: safe on network storage (see JudgementCache)
        cache=f"{RES}/cache/judgements",
    log:
        f"{RES}/logs/behavior/{{judge}}/{{model}}.log",
    priority: 10
    threads: 1
    resources:
        mem_mb=3000,
        runtime=60,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon judge-runs --judge-spec {params.spec:q} --judge-name {wildcards.judge:q} --answers {input.answers:q}"
        " --kinds {params.kinds:q} --trait-file {input.traits:q} --settings {params.settings:q}"
        " --cache {params.cache:q} --judged {output.judged:q} --table {output.table:q} --figure {output.figure:q}"
        " --threads {threads} > {log:q} 2>&1"


rule judge_agreement:
    input:
        judged=expand(f"{RES}/behavior/{{judge}}/{{{{model}}}}/judged.jsonl", judge=JUDGES),
    output:
        table=report(
            f"{RES}/behavior/{{model}}/judge_agreement.csv",
            caption="../report/judge_agreement.rst",
            category="Behaviour",
            subcategory="{model}",
        ),
    params:
        settings=behavior_settings,
    log:
        f"{RES}/logs/behavior/{{model}}/judge_agreement.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon judge-agreement --judged {input.judged:q} --settings {params.settings:q} --out {output.table:q}"
        " > {log:q} 2>&1"
