"""How long a command takes to answer: a mistyped key, a bad value, --help, a data folder that
is not there, and classifying one image end to end, against `python -c "import torch"` on the
same machine.

    python bench/startup.py [--ckpt logs/demo/runs/<time>/checkpoints/epoch_004.ckpt]
                            [--image a.jpg] [--runs 5]

Each command runs --runs times, each a fresh process, the commands taking turns so that a change
in the machine's load touches them all; the median wall time and the median peak resident memory
of the process (os.wait4's ru_maxrss) are printed as a Markdown table with the CPU and the load
average. Without --ckpt a demo model is trained once first (python train.py experiment=demo,
about 2 minutes on 2 cores), with its data, logs, MLflow store and caches in a temporary folder;
its training converts the backbone for OpenVINO (data.engine=auto), which prediction then reads
from the same cache. With --ckpt an untimed first prediction converts it.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(command: list[str], expect: int) -> tuple[float, float]:
    """Wall seconds and peak resident MB of one run of `command`, which must exit `expect`."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    # wait4: this child's own peak memory, not the largest of every child so far.
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read()
    process.stderr.close()
    if code != expect:
        raise SystemExit(f"{' '.join(command)} exited {code}, not {expect}:\n{stderr[-2000:]}")
    return seconds, usage.ru_maxrss / 1024  # KB on Linux


def train_demo(work: Path) -> Path:
    """Train `make demo`'s model under `work`; its best checkpoint."""
    subprocess.run(
        [sys.executable, "train.py", "experiment=demo", f"paths.data_dir={work / 'data'}",
         f"paths.log_dir={work / 'logs'}", f"paths.mlruns_dir={work / 'mlruns'}",
         f"paths.cache_dir={work / 'cache'}", "trainer.enable_progress_bar=false"],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return sorted((work / "logs").rglob("checkpoints/epoch_*.ckpt"))[-1]


def one_image(data: Path) -> Path:
    """An image of the demo set in `data`, generated (one per class) when there is none."""
    images = sorted(data.rglob("*.jpg"))
    if not images:
        sys.path.insert(0, str(ROOT))
        from sem_cls.data.synthetic import generate_dataset

        generate_dataset(data / "synthetic", images_per_class=1, seed=0)
        images = sorted(data.rglob("*.jpg"))
    return images[0]


def cpu() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = [flag for flag in ("avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    model = fields.get("Model name", platform.processor()).strip()
    return f"{model}, {os.cpu_count()} CPUs, flags: {', '.join(wanted) or 'none of avx512/amx'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="a trained checkpoint; default: train one")
    parser.add_argument("--image", type=Path, help="the image to classify; default: a demo one")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = args.ckpt.resolve() if args.ckpt else train_demo(work)
        image = args.image or one_image(work / "data")
        outputs = [f"paths.log_dir={work / 'logs'}", f"paths.mlruns_dir={work / 'mlruns'}"]
        cache = f"paths.cache_dir={work / 'cache'}"  # where train_demo converted the backbone
        python = sys.executable
        commands = {
            'python -c "import torch"': ([python, "-c", "import torch"], 0),
            "python train.py model.optimizer.lrr=0.1": (
                [python, "train.py", "model.optimizer.lrr=0.1", *outputs], 2),
            "python train.py data.batch_size=0": (
                [python, "train.py", "data.batch_size=0", *outputs], 2),
            "python train.py --help": ([python, "train.py", "--help"], 0),
            "python train.py data.data_dir=<missing>": (
                [python, "train.py", f"data.data_dir={work / 'missing'}", *outputs], 2),
            "python -m sem_cls.predict (one image, demo model)": (
                [python, "-m", "sem_cls.predict", f"ckpt_path={ckpt}", f"inputs={image}",
                 f"output={work / 'predictions.csv'}", cache, *outputs], 0),
        }  # fmt: skip
        measure(*commands["python -m sem_cls.predict (one image, demo model)"])  # the cache
        load = os.getloadavg()
        runs = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, (command, expect) in commands.items():
                runs[name].append(measure(command, expect))
        load = [max(a, b) for a, b in zip(load, os.getloadavg(), strict=True)]
        print(f"CPU: {cpu()}; load average up to {load[0]:.1f} (1 min); {args.runs} runs each, "
              "interleaved, medians\n")  # fmt: skip
        print("| command | wall s | peak MB | / import torch |\n|---|---|---|---|")
        torch_seconds = statistics.median(s for s, _ in runs['python -c "import torch"'])
        for name, measured in runs.items():
            seconds = statistics.median(s for s, _ in measured)
            memory = statistics.median(m for _, m in measured)
            ratio = seconds / torch_seconds
            print(f"| `{name}` | {seconds:.2f} | {memory:,.0f} | {ratio:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
