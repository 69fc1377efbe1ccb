"""CPU-s per short job alone vs through the job server (robust_ebm.jobserver), outside CI.

    cd <a folder with params.yaml> && python benchmarks/jobserver_startup.py 8

Runs the smoke digits data stage N times as its own process, then N times through a freshly started
server (its start-up included), two rounds; CPU = user + sys of every process (the server and its
children are counted once the server is reaped). Results: docs/measurements.md.
"""
import os, resource, subprocess, sys, time
from robust_ebm import jobserver
N = int(sys.argv[1])
env = {k: v for k, v in os.environ.items() if k != jobserver.ENV}
def cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN); return r.ru_utime + r.ru_stime
def job(i, e):
    subprocess.run([sys.executable, "-m", "robust_ebm", "data", "--profile", "smoke", "--dataset", "digits", "--out", f"out{i}"], env=e, check=True, capture_output=True)
res = {}
for round_ in range(2):
    c0, t0 = cpu(), time.time()
    for i in range(N): job(i, env)
    res.setdefault("alone", []).append(((cpu() - c0) / N, (time.time() - t0) / N))
    c0, t0 = cpu(), time.time()
    srv = jobserver.start()
    c_start = cpu()
    e = dict(env, **{jobserver.ENV: srv.socket_path})
    for i in range(N): job(i, e)
    jobserver.stop([srv])  # the server and its children are counted once it is reaped
    res.setdefault("server (start included)", []).append(((cpu() - c0) / N, (time.time() - t0) / N))
for k, v in res.items(): print(k, "CPU-s/job, wall-s/job per round:", [(round(a, 2), round(b, 1)) for a, b in v])
