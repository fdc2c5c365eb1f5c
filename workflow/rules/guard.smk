# Guarded finetunes (finetune.guard / a perturbation's guard) against their unguarded twins: the final checkpoint's
# judged EM rate and held-out loss of each, the stop and rollback steps. Requested by `all` only when some
# perturbation is guarded, so a finished unguarded study stays finished.


rule guard_comparison:
    input:
        behavior=expand(f"{RES}/behavior/{PRIMARY_JUDGE}/{{model}}/em_scores.csv", model=MODELS),
        runs=guard_run_files,
        eval_logs=guard_eval_logs,
    output:
        table=report(f"{RES}/analysis/guard/guard.csv", caption="../report/guard.rst", category="Guard",
                     labels={"what": "guarded vs unguarded runs"}),
    params:
        runs=guard_runs_arg,
        eval_logs=guard_eval_logs_arg,
        pairs=guard_pairs,
    log:
        f"{RES}/logs/analysis/guard.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon guard-comparison --behavior {input.behavior:q} --runs {params.runs:q}"
        " --eval-logs {params.eval_logs:q} --pairs {params.pairs:q} --out {output.table:q} > {log:q} 2>&1"
