rule extract_directions:
    # expensive and reusable: shared between sweeps through SNAKEMAKE_OUTPUT_CACHE with --cache
    cache: "omit-software"
    input:
        model=f"{RES}/models/{{model}}",
        trait=trait_path,
    output:
        store=directory(f"{RES}/directions/{{model}}/{{trait}}.zarr"),
        responses=f"{RES}/directions/{{model}}/{{trait}}.responses.jsonl",
    params:
        settings=directions_settings,
    log:
        f"{RES}/logs/directions/{{model}}/{{trait}}.log",
    threads: THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=GPU,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon extract --model-dir {input.model:q} --model-key {wildcards.model:q} --trait-file {input.trait:q}"
        " --settings {params.settings:q} --out {output.store:q} --responses {output.responses:q}"
        " --threads {threads} > {log:q} 2>&1"


rule steer_directions:
    input:
        model=f"{RES}/models/{{model}}",
        trait=trait_path,
        direction=f"{RES}/directions/{{model}}/{{trait}}.zarr",
    output:
        table=f"{RES}/directions/{{model}}/{{trait}}.steering.csv",
    params:
        settings=steering_settings,
    log:
        f"{RES}/logs/steering/{{model}}/{{trait}}.log",
    threads: THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=GPU,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon steer --model-dir {input.model:q} --direction {input.direction:q} --trait-file {input.trait:q}"
        " --settings {params.settings:q} --out {output.table:q} --threads {threads} > {log:q} 2>&1"


rule summarize_directions:
    input:
        directions=model_directions,
        steering=model_steering,
    output:
        summary=f"{RES}/directions/{{model}}/summary.csv",
        cosines=f"{RES}/directions/{{model}}/cosines.csv",
        figure=report(
            f"{RES}/directions/{{model}}/separation_by_layer.png",
            caption="../report/separation_by_layer.rst",
            category="Trait directions",
            subcategory="{model}",
        ),
        cosine_figure=report(
            f"{RES}/directions/{{model}}/direction_cosines.png",
            caption="../report/direction_cosines.rst",
            category="Trait directions",
            subcategory="{model}",
        ),
    log:
        f"{RES}/logs/directions/{{model}}/summary.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/traitmon.yaml"
    shell:
        "traitmon summarize-directions --directions {input.directions:q} --steering {input.steering:q}"
        " --summary {output.summary:q} --cosines {output.cosines:q} --figure {output.figure:q}"
        " --cosine-figure {output.cosine_figure:q} > {log:q} 2>&1"
