# Profile-wide stages: figures, claims and tables of results/<profile>/, and the
# results/tables link to the active profile's tables.


rule figures:
    input: planned("figures", "inputs")
    output:
        report(directory(pattern("figures", "figures")), patterns=["{name}.png"],
               caption="../report/figures.rst", category="Figures"),
    log: pattern("figures", "log")
    params: settings=planned("figures", "settings")
    conda: ENV
    shell: shell_command("figures")


rule claims:
    input: planned("claims", "inputs")
    output:
        pattern("claims", "claims_json"),
        pattern("claims", "claims_csv"),
        report(pattern("claims", "claims_md"), caption="../report/claims.rst", category="Claims"),
    log: pattern("claims", "log")
    params: settings=planned("claims", "settings")
    conda: ENV
    shell: shell_command("claims")


rule tables:
    input: planned("tables", "inputs")
    output:
        report(directory(pattern("tables", "tables")), patterns=["{name}.csv"],
               caption="../report/tables.rst", category="Tables"),
    log: pattern("tables", "log")
    params: settings=planned("tables", "settings")
    conda: ENV
    shell: shell_command("tables")


rule link_tables:
    """results/tables -> <profile>/tables; re-pointed when the active profile changes."""
    input: f"{RESULTS}/{PROFILE}/tables"
    output: directory(f"{RESULTS}/tables")
    params: profile=PROFILE
    shell: "ln -sfn {params.profile}/tables {output}"
