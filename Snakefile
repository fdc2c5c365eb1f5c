# traitmon: trait-space monitoring of LoRA finetuning for emergent misalignment.
# Run: snakemake --cores 2 (see README.md). Rules live in workflow/rules/, logic in src/traitmon/.
from snakemake.utils import min_version

min_version("9.27")


# The embedded default, unless a config is given (--configfile replaces it instead of being merged into it).
if not config.get("models"):

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/directions.smk"
include: "workflow/rules/perturbations.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/capture.smk"
include: "workflow/rules/behavior.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/screen.smk"
include: "workflow/rules/guard.smk"


rule all:
    input:
        all_targets(),
    default_target: True
