"""`mokd bench`: a manifest of checkpoints x protocols, run in three steps (STYLE 14).

    plan    mokd_bench.plan      the manifest (or the command line) -> jobs (checkpoint, protocol, settings)
    run     mokd_bench.run       each job reads features shared through mokd_eval's cache, writes its record(s)
    render  mokd_bench.render    OUT/report.md, report.html, report.csv, figures, from the records alone

The protocols (`mokd_bench.protocols.PROTOCOLS`) call mokd_eval and mokd_analysis; the bench computes nothing of
its own. Only the CLI imports this package.
"""
