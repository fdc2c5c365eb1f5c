# Drift, the SAE baseline's SAE, the study's analysis (LOPO and leave-one-domain-out) and the monitor bundle.
# No pretrained SAE exists for SmolLM2 (nor for Mistral-7B-v0.3 or Qwen2.5-7B); Gemma Scope (Gemma-2-9B) and Llama
# Scope (Llama-3.1-8B) would serve the paper config but are not loaded yet: traitmon trains its own TopK SAE on
# the base model's capture (the measurement prompts, general text among them), once per model and layer.
rule train_sae:
    input:
        capture=f"{RES}/capture/{{model}}/base.zarr",
        directions=sae_directions,
    output:
        sae=f"{RES}/sae/{{model}}/sae.safetensors",
        meta=f"{RES}/sae/{{model}}/sae.json",
    params:
        settings=sae_settings,
        layer_arg=sae_layer_arg,
    log:
        f"{RES}/logs/sae/{{model}}.log",
    cache: "omit-software"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon train-sae --capture {input.capture:q} --directions {input.directions:q} {params.layer_arg}"
        " --model-key {wildcards.model:q} --settings {params.settings:q} --out {output.sae:q}"
        " --threads {threads} > {log:q} 2>&1"


rule drift:
    input:
        directions=model_directions,
        captures=model_captures,
        behavior=primary_behavior_table,
        eval_logs=model_eval_logs,
        sae=f"{RES}/sae/{{model}}/sae.safetensors",
        sae_meta=f"{RES}/sae/{{model}}/sae.json",
    output:
        table=f"{RES}/analysis/{{model}}/drift.csv",
        store=directory(f"{RES}/analysis/{{model}}/drift.zarr"),
        raw=directory(f"{RES}/analysis/{{model}}/raw_drift.zarr"),
        random=f"{RES}/analysis/{{model}}/random_drift.csv",
        sae_drift=directory(f"{RES}/analysis/{{model}}/sae_drift.zarr"),
    params:
        # PERTURBATION=PATH: eval_log.csv carries no run identity, so its perturbation travels by name
        eval_logs=lambda wildcards, input: [f"{p}={path}" for p, path in zip(PERTURBATIONS, input.eval_logs)],
        kinds=perturbation_kinds,
        domains=perturbation_domains,
        styles=perturbation_styles,
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
        " --random {output.random:q} --domains {params.domains:q} --styles {params.styles:q}"
        " --sae {input.sae:q} --sae-drift {output.sae_drift:q} > {log:q} 2>&1"


rule analyze:
    input:
        drift=expand(f"{RES}/analysis/{{model}}/drift.csv", model=MODELS),
        raw=expand(f"{RES}/analysis/{{model}}/raw_drift.zarr", model=MODELS),
        random=expand(f"{RES}/analysis/{{model}}/random_drift.csv", model=MODELS),
        sae_drift=expand(f"{RES}/analysis/{{model}}/sae_drift.zarr", model=MODELS),
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
        verdict=report(f"{RES}/analysis/verdict.csv", caption="../report/verdict_table.rst", category="Verdict",
                       labels={"what": "verdict table"}),
        controls_match=report(f"{RES}/analysis/controls_match.csv", caption="../report/controls_match.rst",
                              category="Verdict", labels={"what": "matched controls"}),
        verdict_figure=report(f"{RES}/analysis/figures/verdict.png", caption="../report/verdict.rst",
                              category="Verdict", labels={"figure": "verdict"}),
        lead=report(f"{RES}/analysis/figures/lead_distribution.png", caption="../report/lead_distribution.rst",
                    category="Verdict", labels={"figure": "early-warning lead"}),
        raw_norm=report(f"{RES}/analysis/figures/raw_drift_norm.png", caption="../report/raw_drift_norm.rst",
                        category="Verdict", labels={"figure": "raw drift norm per run"}),
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
        " --sae-drift {input.sae_drift:q}"
        " --theta {params.theta} --target-fnr {params.target_fnr} --theta-sweep {params.theta_sweep}"
        " --persistence {params.persistence} --n-boot {params.n_boot}"
        " --drift-table {output.drift:q} --metrics {output.metrics:q} --predictions {output.predictions:q}"
        " --monitor {output.monitor:q} --baselines {output.baselines:q} --correlations {output.correlations:q}"
        " --axis {output.axis:q} --early-warning {output.early_warning:q} --theta-sweep-table {output.theta_sweep:q}"
        " --figure-drift {output.drift_figure:q} --figure-loadings {output.loadings:q}"
        " --figure-scatter {output.scatter:q} --figure-roc {output.roc:q} --figure-alarms {output.alarms:q}"
        " --figure-comparison {output.comparison:q} --verdict {output.verdict:q}"
        " --controls-match {output.controls_match:q} --figure-verdict {output.verdict_figure:q}"
        " --figure-lead {output.lead:q} --figure-raw-norm {output.raw_norm:q} > {log:q} 2>&1"


rule monitor_bundle:
    input:
        model=f"{RES}/models/{{model}}",
        directions=model_directions,
        monitor=f"{RES}/analysis/monitor/monitor.json",
    output:
        bundle=directory(f"{RES}/analysis/{{model}}/monitor_bundle"),
    params:
        per_trait=SETTINGS.capture.per_trait_questions,
        variant=SETTINGS.analysis.variant,
        batch_size=SETTINGS.capture.batch_size,
        precision=SETTINGS.capture.precision,
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
        " --directions {input.directions:q} --per-trait-questions {params.per_trait:q} --variant {params.variant:q} --monitor {input.monitor:q}"
        " --dtype {params.dtype:q} --batch-size {params.batch_size:q} --precision {params.precision:q}"
        " --out {output.bundle:q}"
        " --threads {threads} > {log:q} 2>&1"
