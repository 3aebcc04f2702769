"""``arraybn info``: version, backends usable here, GPU, dataset locations."""
import os
import platform

import click
import numpy

import arraybn
from arraybn.backends import BACKEND_NAMES, BackendUnavailableError
from arraybn.data import DATASETS, DatasetNotFoundError, ENV_VAR, candidate_dirs, find_dataset
from arraybn_cli.reporting import Reporter


def backend_report():
    """{name: 'ok' or the reason it cannot run here}."""
    report = {}
    for name in BACKEND_NAMES:
        try:
            arraybn.get_backend(name)
            report[name] = "ok"
        except BackendUnavailableError as exc:
            report[name] = str(exc)
    return report


def gpu_report(backends):
    if backends.get("cupy") != "ok":
        return None
    cupy = arraybn.get_backend("cupy").xp
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return {"name": name.decode() if isinstance(name, bytes) else str(name),
            "memory_gib": round(props["totalGlobalMem"] / 2 ** 30, 1)}


def default_backend():
    """The backend 'auto' picks here, or why it cannot pick one (e.g. a bad $ARRAYBN_BACKEND)."""
    try:
        return arraybn.get_backend("auto").name
    except (BackendUnavailableError, ValueError) as exc:
        return f"none: {exc}"


def dataset_report(data_dir):
    report = {}
    for name in DATASETS:
        try:
            directory, _ = find_dataset(name, data_dir)
            report[name] = {"found": directory}
        except DatasetNotFoundError:
            report[name] = {"found": None, "searched": candidate_dirs(name, data_dir)}
    return report


def _describe(info):
    lines = [f"arraybn {info['version']} (Python {info['python']}, NumPy {info['numpy']})",
             "backends:"]
    lines += [f"  {name:<6} {state}" for name, state in info["backends"].items()]
    gpu = info["gpu"]
    lines.append(f"GPU: {gpu['name']} ({gpu['memory_gib']} GiB)" if gpu else "GPU: none usable")
    lines.append(f"default backend ('auto'): {info['default_backend']}")
    lines.append("datasets:")
    for name, found in info["datasets"].items():
        searched = ", ".join(found.get("searched", [])) or f"nothing: no --data-dir, no ${ENV_VAR}"
        where = found["found"] or f"not found (searched {searched})"
        lines.append(f"  {name:<14} {where}")
    return "\n".join(lines)


@click.command("info")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Also look for the datasets here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def info_command(data_dir, as_json):
    """Show the version, the backends usable here, the GPU and where the datasets are."""
    backends = backend_report()
    info = {"version": arraybn.__version__, "python": platform.python_version(),
            "numpy": numpy.__version__, "backends": backends, "gpu": gpu_report(backends),
            "default_backend": default_backend(),
            "env": {key: os.environ.get(key) for key in (ENV_VAR, "ARRAYBN_BACKEND")},
            "datasets": dataset_report(data_dir)}
    Reporter(as_json).result(info, _describe(info))
