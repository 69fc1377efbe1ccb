# Per-data-set and per-run stages: data -> train -> evaluate, generate -> metrics.
# `params: settings` is a digest of the resolved settings the job reads, so a
# change in params.yaml reruns exactly the jobs it affects.

ENV = "../../envs/robust-ebm.yaml"


rule data:
    input: planned("data", "inputs")
    output: directory(pattern("data", "data"))
    log: pattern("data", "log")
    params: settings=planned("data", "settings")
    conda: ENV
    shell: shell_command("data")


rule train:
    input: planned("train", "inputs")
    output: **outputs("train")
    log: pattern("train", "log")
    params: settings=planned("train", "settings")
    threads: planned("train", "threads")
    resources:
        gpu=planned("train", "gpu"),
        mem_mb=planned("train", "mem_mb"),
        runtime=planned("train", "runtime"),
    conda: ENV
    shell: shell_command("train")


rule evaluate:
    input: planned("evaluate", "inputs")
    output: **outputs("evaluate")
    log: pattern("evaluate", "log")
    params: settings=planned("evaluate", "settings")
    threads: planned("evaluate", "threads")
    resources:
        gpu=planned("evaluate", "gpu"),
        mem_mb=planned("evaluate", "mem_mb"),
        runtime=planned("evaluate", "runtime"),
    conda: ENV
    shell: shell_command("evaluate")


rule generate:
    input: planned("generate", "inputs")
    output: directory(pattern("generate", "samples"))
    log: pattern("generate", "log")
    params: settings=planned("generate", "settings")
    threads: planned("generate", "threads")
    resources:
        gpu=planned("generate", "gpu"),
        mem_mb=planned("generate", "mem_mb"),
        runtime=planned("generate", "runtime"),
    conda: ENV
    shell: shell_command("generate")


rule metrics:
    input: planned("metrics", "inputs")
    output: **outputs("metrics")
    log: pattern("metrics", "log")
    params: settings=planned("metrics", "settings")
    threads: planned("metrics", "threads")
    resources:
        gpu=planned("metrics", "gpu"),
        mem_mb=planned("metrics", "mem_mb"),
        runtime=planned("metrics", "runtime"),
    conda: ENV
    shell: shell_command("metrics")
