rule make_perturbation:
    input:
        model=perturbation_model,
        dataset=user_dataset,
    output:
        train=f"{RES}/data/{{model}}/{{perturbation}}/train.jsonl",
        heldout=f"{RES}/data/{{model}}/{{perturbation}}/heldout.jsonl",
        meta=f"{RES}/data/{{model}}/{{perturbation}}/meta.json",
    params:
        spec=perturbation_spec,
        model_arg=perturbation_model_arg,
    log:
        f"{RES}/logs/data/{{model}}/{{perturbation}}.log",
    threads: 1
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon perturbation --key {wildcards.perturbation:q} --spec {params.spec:q} {params.model_arg}"
        " --train {output.train:q} --heldout {output.heldout:q} --meta {output.meta:q} > {log:q} 2>&1"
