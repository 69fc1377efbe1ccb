# Profile-wide stages: figures, claims and tables of results/<profile>/, and the
# results/tables link to the active profile's tables. The report groups figures by kind and
# method (robust_ebm.report reads figures.json) and shows each table inline as its HTML page.

from robust_ebm import report as report_groups


rule figures:
    input: planned("figures", "inputs")
    output:
        report(directory(pattern("figures", "figures")), patterns=["{name}.png"],
               caption="../report/figures.rst",
               category=lambda wildcards, output: report_groups.figure_category(output[0], wildcards.name),
               subcategory=lambda wildcards, output: report_groups.figure_subcategory(output[0], wildcards.name),
               labels=lambda wildcards, output: report_groups.figure_labels(output[0], wildcards.name)),
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
        pattern("claims", "summary"),
    log: pattern("claims", "log")
    params: settings=planned("claims", "settings")
    conda: ENV
    shell: shell_command("claims")


rule tables:
    input: planned("tables", "inputs")
    output:
        report(directory(pattern("tables", "tables")), patterns=["{name}.html"],
               caption="../report/tables.rst", category=report_groups.TABLE_CATEGORY,
               subcategory=lambda wildcards: report_groups.table_subcategory(wildcards.name),
               labels=lambda wildcards: {"table": wildcards.name}),
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
