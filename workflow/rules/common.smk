# Helpers shared by the rules: everything is looked up in the plan of the
# job's own profile (wildcard `profile`), so results/<P>/... of any profile
# can be requested, whatever the active profile is.

wildcard_constraints:
    profile="|".join(PLANS),
    dataset="|".join(sorted({d for plan in PLANS.values() for d in plan.datasets})),
    method="|".join(sorted({m for plan in PLANS.values() for m in plan.methods})),
    seed=r"\d+",


def pattern(stage, key):
    """A path pattern of the plan with Snakemake wildcards, e.g. results/{profile}/eval/...json."""
    return PLAN.template(stage, "pattern")[key]


def outputs(stage):
    """The plan's outputs of `stage` (plan.OUTPUTS), named by their PATTERNS key: `output: **outputs("train")`."""
    return {key: pattern(stage, key) for key in OUTPUTS[stage]}


def shell_command(stage):
    """The plan's command of `stage` with {wildcards.x} placeholders (identical to dvc.yaml's)."""
    return PLAN.template(stage, "snakemake")["command"]


def planned(stage, what):
    """Input/params/resources function: ask the plan of the job's profile."""

    def lookup(wildcards):
        plan = PLANS[wildcards.profile]
        w = dict(wildcards.items())
        if what == "inputs":
            return plan.job(stage, **w).inputs
        if what == "settings":
            return plan.settings(stage, **w)
        return plan.resources(stage)[what]

    return lookup
