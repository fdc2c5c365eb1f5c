rule make_perturbation:
    wildcard_constraints:
        perturbation=one_of([p for p in PERTURBATIONS if p not in FILTERED]),
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


rule filter_perturbation:
    # the training set of filter.of without its highest-risk rows by that set's base-model screening (its
    # activation store projected on the model's directions here)
    wildcard_constraints:
        perturbation=one_of(FILTERED),
    input:
        unpack(filter_source),
    output:
        train=f"{RES}/data/{{model}}/{{perturbation}}/train.jsonl",
        heldout=f"{RES}/data/{{model}}/{{perturbation}}/heldout.jsonl",
        meta=f"{RES}/data/{{model}}/{{perturbation}}/meta.json",
    params:
        top_fraction=lambda wildcards: config["perturbations"][wildcards.perturbation]["filter"]["top_fraction"],
    log:
        f"{RES}/logs/data/{{model}}/{{perturbation}}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "(traitmon screen {input.data:q} --activations {input.activations:q} --directions {input.directions:q}"
        " --filter {params.top_fraction} --out {output.train:q} --meta {output.meta:q}"
        " && cp {input.heldout:q} {output.heldout:q}) > {log:q} 2>&1"
