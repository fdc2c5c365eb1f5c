rule sample_answers_base:
    input:
        model=f"{RES}/models/{{model}}",
        traits=trait_files,
    output:
        answers=f"{RES}/answers/{{model}}/base.jsonl",
    params:
        settings=behavior_settings,
    log:
        f"{RES}/logs/answers/{{model}}/base.log",
    threads: THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=GPU,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon answers --model-dir {input.model} --trait-file {input.traits} --settings {params.settings:q}"
        " --out {output.answers} --label 'base' --threads {threads} > {log} 2>&1"


rule sample_answers:
    input:
        model=f"{RES}/models/{{model}}",
        adapter=f"{RES}/finetune/{{model}}/{{perturbation}}/checkpoint-{{step}}",
        traits=trait_files,
    output:
        answers=f"{RES}/answers/{{model}}/{{perturbation}}/step-{{step}}.jsonl",
    params:
        settings=behavior_settings,
    log:
        f"{RES}/logs/answers/{{model}}/{{perturbation}}/step-{{step}}.log",
    threads: THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=GPU,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon answers --model-dir {input.model} --adapter {input.adapter} --trait-file {input.traits}"
        " --settings {params.settings:q} --out {output.answers} --label '{wildcards.perturbation} {wildcards.step}'"
        " --threads {threads} > {log} 2>&1"


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
        runs=behavior_runs,
        kinds=perturbation_kinds,
        cache=f"{RES}/cache/judgements.sqlite",
    log:
        f"{RES}/logs/behavior/{{judge}}/{{model}}.log",
    threads: 1
    resources:
        mem_mb=3000,
        runtime=60,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon judge-runs --judge-spec {params.spec:q} --answers {input.answers} --runs {params.runs}"
        " --kinds {params.kinds} --trait-file {input.traits} --settings {params.settings:q} --cache {params.cache}"
        " --judged {output.judged} --table {output.table} --figure {output.figure} --threads {threads} > {log} 2>&1"


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
        "traitmon judge-agreement --judged {input.judged} --settings {params.settings:q} --out {output.table} > {log} 2>&1"
