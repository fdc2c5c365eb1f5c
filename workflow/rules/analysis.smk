rule drift:
    input:
        directions=model_directions,
        captures=model_captures,
        behavior=primary_behavior_table,
        eval_logs=model_eval_logs,
    output:
        table=f"{RES}/analysis/{{model}}/drift.csv",
        store=directory(f"{RES}/analysis/{{model}}/drift.zarr"),
        raw=directory(f"{RES}/analysis/{{model}}/raw_drift.zarr"),
        random=f"{RES}/analysis/{{model}}/random_drift.csv",
    params:
        # PERTURBATION=PATH: eval_log.csv carries no run identity, so its perturbation travels by name
        eval_logs=lambda wildcards, input: [f"{p}={path}" for p, path in zip(PERTURBATIONS, input.eval_logs)],
        kinds=perturbation_kinds,
        variant=SETTINGS.analysis.variant,
    log:
        f"{RES}/logs/analysis/{{model}}/drift.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon drift --captures {input.captures:q} --directions {input.directions:q}"
        " --behavior {input.behavior:q} --eval-logs {params.eval_logs:q} --kinds {params.kinds}"
        " --variant {params.variant:q} --table {output.table:q} --store {output.store:q} --raw {output.raw:q}"
        " --random {output.random:q} > {log:q} 2>&1"


rule analyze:
    input:
        drift=expand(f"{RES}/analysis/{{model}}/drift.csv", model=MODELS),
        raw=expand(f"{RES}/analysis/{{model}}/raw_drift.zarr", model=MODELS),
        random=expand(f"{RES}/analysis/{{model}}/random_drift.csv", model=MODELS),
    output:
        drift=f"{RES}/analysis/drift.csv",
        metrics=report(f"{RES}/analysis/monitor/metrics.json", category="Monitor", labels={"what": "metrics"}),
        predictions=f"{RES}/analysis/monitor/predictions.csv",
        monitor=f"{RES}/analysis/monitor/monitor.json",
        baselines=report(f"{RES}/analysis/baselines.csv", caption="../report/baselines.rst", category="Monitor",
                         labels={"what": "monitor vs baselines"}),
        correlations=report(f"{RES}/analysis/correlations.csv", caption="../report/correlations.rst",
                            category="EM axis", labels={"what": "correlations"}),
        axis=f"{RES}/analysis/em_axis.json",
        early_warning=report(f"{RES}/analysis/early_warning.csv", caption="../report/early_warning.rst",
                             category="Monitor", labels={"what": "early warning"}),
        theta_sweep=report(f"{RES}/analysis/theta_sweep.csv", caption="../report/theta_sweep.rst",
                           category="Monitor", labels={"what": "theta sweep"}),
        drift_figure=report(f"{RES}/analysis/figures/drift_trajectories.png",
                            caption="../report/drift_trajectories.rst", category="Drift", labels={"figure": "drift"}),
        loadings=report(f"{RES}/analysis/figures/pc1_loadings.png", caption="../report/pc1_loadings.rst",
                        category="EM axis", labels={"figure": "PC1 loadings"}),
        scatter=report(f"{RES}/analysis/figures/pc1_vs_em.png", caption="../report/pc1_vs_em.rst",
                       category="EM axis", labels={"figure": "PC1 vs EM"}),
        roc=report(f"{RES}/analysis/figures/roc_curves.png", caption="../report/roc_curves.rst",
                   category="Monitor", labels={"figure": "ROC"}),
        alarms=report(f"{RES}/analysis/figures/em_and_alarms.png", caption="../report/em_and_alarms.rst",
                      category="Monitor", labels={"figure": "alarms"}),
        comparison=report(f"{RES}/analysis/figures/comparison_forest.png",
                          caption="../report/comparison_forest.rst", category="Monitor",
                          labels={"figure": "comparison with intervals"}),
    params:
        theta=SETTINGS.analysis.theta,
        target_fnr=SETTINGS.analysis.target_fnr,
        theta_sweep=" ".join(str(t) for t in SETTINGS.analysis.theta_sweep),
        persistence=SETTINGS.analysis.persistence,
        n_boot=SETTINGS.analysis.n_boot,
    log:
        f"{RES}/logs/analysis/analyze.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon analyze --drift {input.drift:q} --raw {input.raw:q} --random {input.random:q}"
        " --theta {params.theta} --target-fnr {params.target_fnr} --theta-sweep {params.theta_sweep}"
        " --persistence {params.persistence} --n-boot {params.n_boot}"
        " --drift-table {output.drift:q} --metrics {output.metrics:q} --predictions {output.predictions:q}"
        " --monitor {output.monitor:q} --baselines {output.baselines:q} --correlations {output.correlations:q}"
        " --axis {output.axis:q} --early-warning {output.early_warning:q} --theta-sweep-table {output.theta_sweep:q}"
        " --figure-drift {output.drift_figure:q} --figure-loadings {output.loadings:q}"
        " --figure-scatter {output.scatter:q} --figure-roc {output.roc:q} --figure-alarms {output.alarms:q}"
        " --figure-comparison {output.comparison:q} > {log:q} 2>&1"


rule monitor_bundle:
    input:
        model=f"{RES}/models/{{model}}",
        directions=model_directions,
        traits=trait_files,
        monitor=f"{RES}/analysis/monitor/monitor.json",
    output:
        bundle=directory(f"{RES}/analysis/{{model}}/monitor_bundle"),
    params:
        per_trait=SETTINGS.capture.per_trait_questions,
        variant=SETTINGS.analysis.variant,
        batch_size=SETTINGS.capture.batch_size,
        dtype=model_dtype,
    log:
        f"{RES}/logs/analysis/{{model}}/bundle.log",
    threads: THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=GPU,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon bundle --model-dir {input.model:q} --model-key {wildcards.model:q}"
        " --directions {input.directions:q} --trait-file {input.traits:q}"
        " --per-trait-questions {params.per_trait:q} --variant {params.variant:q} --monitor {input.monitor:q}"
        " --dtype {params.dtype:q} --batch-size {params.batch_size:q} --out {output.bundle:q}"
        " --threads {threads} > {log:q} 2>&1"
