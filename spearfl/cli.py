"""The `spearfl` command: run experiments, evaluate adapters, inspect datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from spearfl.config import load_config
from spearfl.errors import UserError


class ReportUserErrors(TyperGroup):
    """Every command: a mistake in the user's input (spearfl.errors.UserError) prints one message, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as error:
            fail(str(error))


app = typer.Typer(
    cls=ReportUserErrors,
    help=(
        "spearfl: online federated fine-tuning of language models from user feedback (SPEAR).\n\n"
        "Clients answer prompts with a shared base model plus a LoRA adapter, get a verdict and a hint that "
        "never states the answer, revise, and train on their own correct answers; a server aggregates adapters."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True)

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config field, e.g. --set server.rounds=3 (repeatable)."),
]


@app.callback()
def quiet_libraries() -> None:
    """Quiet the libraries' own progress bars and deprecation notes; spearfl shows its own progress."""
    from spearfl.lm.models import quiet_library_output

    quiet_library_output()


def fail(message: str) -> None:
    errors.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def load_checked(config_path: Optional[Path], overrides: Optional[list[str]]):
    """The config with its overrides, validated and checked against the registries (ConfigError otherwise)."""
    from spearfl.runtime.setup import check_config

    config = load_config(config_path, overrides or [])
    check_config(config)
    return config


@app.command()
def run(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="Run config (see configs/).")],
    set_: SetOption = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete the output folder first instead of resuming.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")] = False,
) -> None:
    """Run a federated experiment (or resume an unfinished one in the same output folder)."""
    config = load_checked(config_path, set_)
    from spearfl.runtime.local import run_local

    summary = run_local(config, fresh=fresh, show_progress=not quiet)
    before, after = summary["before"], summary["after"]
    format_free = [  # multiple choice only
        f"{title} {before[key]:.3f} -> {after[key]:.3f}"
        for key, title in (("loglik_accuracy", "option log-likelihood"), ("cloze_accuracy", "cloze"))
        if key in before and key in after
    ]
    console.print(
        f"held-out accuracy: before {before.get('accuracy', float('nan')):.3f} -> after {after.get('accuracy', float('nan')):.3f}"
        + (f"  ({', '.join(format_free)})" if format_free else "")
    )
    console.print(f"run folder: {config.output_dir}")


@app.command()
def compare(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="Run config shared by every run.")],
    algorithms: Annotated[
        Optional[str], typer.Option(help="Comma-separated client updates, e.g. spear,feedback_sft,grpo,opsd,rltf_sd.")
    ] = None,
    personal: Annotated[
        Optional[str],
        typer.Option(help="Comma-separated personalization methods instead, e.g. tap,none,local,ditto,finetune,fedper, "
                     "scored on each client's own held-out data."),
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Runs per method, with seeds seed, seed+1, ... of the config.")] = 3,
    set_: SetOption = None,
    output: Annotated[
        Optional[Path], typer.Option(help="Folder for the runs and the comparison (default: the config's output_dir/compare).")
    ] = None,
) -> None:
    """Run every (method, seed) pair on one config, resuming unfinished ones, then tabulate and plot them.

    Give --algorithms to compare client updates, or --personal to compare personalization methods."""
    if (algorithms is None) == (personal is None):
        fail("give either --algorithms (client updates) or --personal (personalization methods)")
    config = load_checked(config_path, set_)
    from spearfl.tools.compare import default_output_dir

    output = output or default_output_dir(config)
    if personal is not None:
        compare_personalization(config, personal, seeds, output)
        return
    from spearfl.tools.compare import compare as run_comparison
    from spearfl.tools.compare import comparison_table, parse_algorithms
    from spearfl.tools.paired import paired_table

    names = parse_algorithms(algorithms)
    comparison = run_comparison(config, names, seeds, output)
    console.print(comparison_table(comparison.rows, comparison.metrics))
    if comparison.paired:
        console.print(paired_table(comparison.paired, comparison.reference))
    files = ", ".join(str(output / name) for name in ("comparison.md", "comparison.csv", "paired.csv"))
    console.print(f"comparison: {files}")


def compare_personalization(config, methods: str, seeds: int, output: Path) -> None:
    from spearfl.tools.paired import paired_table
    from spearfl.tools.personal_compare import compare_personal, parse_methods, personal_table

    comparison = compare_personal(config, parse_methods(methods), seeds, output)
    console.print(personal_table(comparison.rows))
    if comparison.paired:
        console.print(paired_table(comparison.paired, comparison.reference, "personal.md", "mean over clients of their own held-out accuracy"))
    files = ", ".join(str(output / name) for name in ("personal.md", "personal.csv", "personal_paired.csv", "clients_by_method.png"))
    console.print(f"comparison: {files}")


TlsCertOption = Annotated[
    Optional[Path], typer.Option(help="Certificate (PEM) to serve https with; with --tls-key. Clients verify it against their CA file.")
]
TlsKeyOption = Annotated[Optional[Path], typer.Option(help="Private key (PEM) of --tls-cert.")]


def tls_files(certificate: Optional[Path], key: Optional[Path]) -> tuple[str, str] | None:
    """(certificate, key) to serve https with, both or neither; None for plain http."""
    if (certificate is None) != (key is None):
        fail("--tls-cert and --tls-key go together")
    for path in (certificate, key):
        if path is not None and not path.is_file():
            fail(f"TLS file not found: {path}")
    return None if certificate is None else (str(certificate), str(key))


@app.command()
def serve(
    config_path: Annotated[
        Optional[Path], typer.Argument(metavar="[CONFIG.yaml]", help="Config naming the model and task format (default: the packaged model).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; beyond 127.0.0.1 both tokens are required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    token: Annotated[
        Optional[str], typer.Option(help="The people's token, for the page and the API (Authorization: Bearer ...); default: $SPEARFL_PEOPLE_TOKEN.")
    ] = None,
    server_token: Annotated[
        Optional[str], typer.Option(help="The federation server's token, for work orders and round notices only; default: $SPEARFL_SERVER_TOKEN.")
    ] = None,
    allow_host: Annotated[
        Optional[list[str]], typer.Option(help="A host name this device is reached by, beside the loopback names and --host (repeatable).")
    ] = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    adapter: Annotated[Optional[Path], typer.Option(help="Adapter (.safetensors) to answer with; default: none yet (version 0).")] = None,
    adapter_version: Annotated[int, typer.Option(min=0, help="Version (round) of --adapter, recorded with every answer.")] = 0,
    set_: SetOption = None,
) -> None:
    """Serve the model on this device: people ask, judge and hint on a web page or through the API; answers are stored
    for the rounds that learn from them."""
    config = load_checked(config_path, set_)
    import uvicorn

    from spearfl.serve.app import create_app
    from spearfl.serve.device import access_tokens, allowed_hosts, build_service, store_path

    people, server = access_tokens(host, token, server_token)
    tls = tls_files(tls_cert, tls_key)
    if adapter is not None and not adapter.is_file():
        fail(f"adapter file not found: {adapter}")
    hosts = allowed_hosts(host, allow_host or ())
    service = build_service(config, people, adapter, adapter_version, server_token=server, hosts=hosts)
    scheme = "https" if tls else "http"
    console.print(f"serving {config.model.name} on {scheme}://{host}:{port} (page /, API docs /docs); store {store_path(config)}")
    console.print(f"answering to the host names {', '.join(sorted(hosts))}")
    certificate, key = tls or (None, None)
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning", ws="none", ssl_certfile=certificate, ssl_keyfile=key)
    finally:
        service.engine.close()
        service.store.close()


@app.command("simulate-users")
def simulate_users(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="Config naming the dataset and feedback the people use.")],
    service: Annotated[
        list[str], typer.Option(help="URL of a running `spearfl serve` (repeatable): service i gets client i's questions.")
    ],
    people: Annotated[int, typer.Option(min=1, help="Simulated people per service, asking concurrently.")] = 4,
    questions: Annotated[int, typer.Option(min=1, help="Questions per service, dealt among its people.")] = 32,
    token: Annotated[Optional[str], typer.Option(help="Access token of the services; default: $SPEARFL_TOKEN.")] = None,
    set_: SetOption = None,
) -> None:
    """Drive running device services with simulated people: they ask, judge like the oracle, hint, and judge revisions."""
    import os

    config = load_checked(config_path, set_)
    from spearfl.runtime.setup import client_feedback, prepare_data
    from spearfl.serve.simulate import deal, simulate_people

    federation = prepare_data(config)
    if len(service) > len(federation.clients):
        fail(f"{len(service)} services but the config partitions its dataset among {len(federation.clients)} clients")
    judge = client_feedback(config)
    table = Table(title=f"simulated people on {len(service)} service(s)")
    for column in ("service", "asked", "first try right", "revisions right", "hints held back", "errors",
                   "first token s (median / p95)", "request s (median / p95)"):
        table.add_column(column)
    for index, url in enumerate(service):
        dealt = deal(federation.clients[index], people, questions, seed=config.seed + index)
        tally = simulate_people(url, dealt, judge, config.spear.num_revisions, token or os.environ.get("SPEARFL_TOKEN"))
        row = tally.summary()
        table.add_row(
            url, str(row["asked"]), f"{tally.first_right} ({row['first_try_accuracy'] or 0:.0%})",
            f"{tally.revisions_right} of {tally.revisions}", str(row["hints_held_back"]), str(row["errors"]),
            seconds_pair(row["first_token_s_median"], row["first_token_s_p95"]),
            seconds_pair(row["request_s_median"], row["request_s_p95"]),
        )
        for error in tally.errors[:3]:
            errors.print(f"{url}: {error}")
    console.print(table)


def seconds_pair(median: float | None, p95: float | None) -> str:
    return "-" if median is None else f"{median:.2f} / {p95:.2f}"


@app.command("attack-bench")
def attack_bench_command(
    config_path: Annotated[
        Optional[Path], typer.Argument(metavar="[CONFIG.yaml]", help="End-to-end runs of this config (e.g. configs/security.yaml).")
    ] = None,
    replay_folder: Annotated[
        Optional[Path], typer.Option("--replay", help="Instead, replay a finished run folder run with server.keep_client_updates=true.")
    ] = None,
    attacks: Annotated[Optional[str], typer.Option(help="Comma-separated attacks (default: every one the mode has).")] = None,
    shares: Annotated[Optional[str], typer.Option(help="Comma-separated shares of malicious clients (default: 0,0.1,0.2,0.3 replayed; 0.2 end-to-end).")] = None,
    defenses: Annotated[Optional[str], typer.Option(help="Comma-separated defenses (default: every one replayed; mean,two_stage end-to-end).")] = None,
    set_: SetOption = None,
    output: Annotated[
        Optional[Path], typer.Option(help="Replay: also write the figures to this JSON file. End-to-end: the folder of the runs and figures.")
    ] = None,
) -> None:
    """Attacks x defenses at shares of malicious clients. With --replay: a finished run's recorded honest updates,
    a share of them attacked, through each defense, in minutes (detection rates, rounds until detection, the
    attack's distortion of each round's step, server seconds per round). With CONFIG.yaml: whole runs, resumable
    (clean accuracy, a backdoor's trigger rate, detection, server seconds per round)."""
    if (config_path is None) == (replay_folder is None):
        fail("give either a CONFIG.yaml for end-to-end runs or --replay RUN_FOLDER, not both or neither")
    if replay_folder is not None:
        replay_bench(replay_folder, attacks, shares, defenses, output)
    else:
        run_bench(load_checked(config_path, set_), attacks, shares, defenses, output)


@app.command("privacy-sweep")
def privacy_sweep_command(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="Run config to sweep (e.g. configs/security.yaml).")],
    noise: Annotated[str, typer.Option(help="Comma-separated noise multipliers of central DP; 0 is the run without DP.")] = "0,0.001,0.01,0.1,0.3,1",
    set_: SetOption = None,
    output: Annotated[Optional[Path], typer.Option(help="Folder for the runs, the table and the plot (default: the config's output_dir/privacy-sweep).")] = None,
) -> None:
    """Utility against epsilon: the config run with central client-level DP at each noise multiplier (resumable),
    then a table and a plot of held-out accuracy against the accountant's epsilon."""
    config = load_checked(config_path, set_)
    from spearfl.tools.attack_bench import cell
    from spearfl.tools.privacy_sweep import privacy_sweep

    try:
        values = [float(value) for value in split_list(noise)]
    except ValueError:
        fail(f"--noise {noise!r}: give comma-separated numbers")
    if not values or any(not value >= 0 for value in values):
        fail(f"--noise {noise!r}: noise multipliers must be 0 (no DP) or positive")
    output = output or Path(config.output_dir) / "privacy-sweep"
    rows = privacy_sweep(config, values, output)
    table = Table(title=f"utility against privacy ({output})")
    for column in ("noise", "epsilon", "loglik acc", "parsed acc"):
        table.add_column(column, justify="right")
    for row in rows:
        epsilon = "no DP" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
        table.add_row(f"{row['noise_multiplier']:g}", epsilon, cell("loglik_accuracy", row["loglik_accuracy"]), cell("accuracy", row["accuracy"]))
    Console().print(table)
    console.print(f"figures: {output / 'privacy-sweep.json'}, {output / 'privacy-sweep.md'}, {output / 'privacy-sweep.png'}")


@app.command("privacy-budget")
def privacy_budget_command(
    clients: Annotated[int, typer.Option(min=1, help="Clients in the federation (N).")],
    per_round: Annotated[int, typer.Option(min=1, help="Clients asked each round (K).")],
    noise: Annotated[float, typer.Option(help="Noise multiplier z (the noise's standard deviation in units of the clip norm).")],
    rounds: Annotated[int, typer.Option(min=1, help="Rounds the run would take.")] = 100,
    mode: Annotated[str, typer.Option(help="central (DP-FedAvg at the server) or local (on each device).")] = "central",
    delta: Annotated[float, typer.Option(help="The delta of (epsilon, delta).")] = 1e-5,
    budget: Annotated[Optional[float], typer.Option(help="An epsilon budget: also say how many rounds it affords.")] = None,
) -> None:
    """Client-level (epsilon, delta) that a federation of this shape spends, from the same accountant a run uses
    (no model, no data): epsilon after a quarter, half and all of the rounds, and the rounds a budget affords."""
    from pydantic import ValidationError

    from spearfl.config import PrivacyConfig
    from spearfl.federated.privacy import affordable_rounds, epsilon_after

    if per_round > clients:
        fail(f"--per-round {per_round} exceeds --clients {clients}")
    if mode not in ("central", "local"):
        fail(f"--mode {mode!r}: choose central or local")
    try:
        settings = PrivacyConfig(mode=mode, noise_multiplier=noise, delta=delta, epsilon_budget=budget)
    except ValidationError as error:
        fail("; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('noise_multiplier', 'noise').replace('epsilon_budget', 'budget')}: {e['msg']}" for e in error.errors()))
    console.print(f"{mode} DP: {clients} clients, {per_round} a round, noise multiplier {noise:g}, delta {delta:g}")
    table = Table()
    table.add_column("rounds", justify="right")
    table.add_column("epsilon", justify="right")
    for count in sorted({max(1, rounds // 4), max(1, rounds // 2), rounds}):
        table.add_row(str(count), f"{epsilon_after(count, settings, clients, per_round):.4g}")
    Console().print(table)
    if budget is not None:
        console.print(f"epsilon {budget:g} affords {affordable_rounds(settings, clients, per_round, rounds)} of the {rounds} rounds")


def parsed_shares(text: str) -> list[float]:
    try:
        values = [float(share) for share in split_list(text)]
    except ValueError:
        fail(f"--shares {text!r}: give comma-separated numbers between 0 and 1")
    if not values or any(not 0 <= value < 1 for value in values):
        fail(f"--shares {text!r}: every share must lie in [0, 1)")
    return values


def chosen_names(text: str, known, what: str) -> list[str]:
    names = split_list(text)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        fail(f"unknown {what} {unknown or text!r}; choose from {list(known)}")
    return names


def replay_bench(folder: Path, attacks: Optional[str], shares: Optional[str], defenses: Optional[str], output: Optional[Path]) -> None:
    from spearfl.io import atomic_write_json, atomic_write_text
    from spearfl.tools.attack_bench import DEFENSES, REPLAY_ATTACKS, REPLAY_COLUMNS, figures_markdown, recorded_rounds, replay

    chosen_attacks = chosen_names(attacks or ",".join(REPLAY_ATTACKS), REPLAY_ATTACKS, "attacks")
    chosen_defenses = chosen_names(defenses or ",".join(DEFENSES), DEFENSES, "defenses")
    values = parsed_shares(shares or "0,0.1,0.2,0.3")
    try:
        rounds = recorded_rounds(folder)
    except ValueError as error:
        fail(str(error))
    rows = [
        replay(rounds, attack, share, DEFENSES[name])
        for attack in chosen_attacks for share in values for name in chosen_defenses
    ]
    Console().print(figures_table(f"replay of {len(rounds)} recorded rounds of {folder}", rows, REPLAY_COLUMNS))
    if output is not None:
        atomic_write_json(output, {"source": str(folder), "figures": rows})
        atomic_write_text(output.with_suffix(".md"), figures_markdown(rows, REPLAY_COLUMNS))
        console.print(f"figures: {output}, {output.with_suffix('.md')}")


def run_bench(config, attacks: Optional[str], shares: Optional[str], defenses: Optional[str], output: Optional[Path]) -> None:
    from spearfl.io import atomic_write_json, atomic_write_text
    from spearfl.tools.attack_bench import DEFENSES, RUN_COLUMNS, figures_markdown
    from spearfl.tools.attack_runs import RUN_ATTACKS, attack_runs

    chosen_attacks = chosen_names(attacks or ",".join(RUN_ATTACKS), RUN_ATTACKS, "attacks")
    chosen_defenses = chosen_names(defenses or "mean,two_stage", DEFENSES, "defenses")
    values = parsed_shares(shares or "0.2")
    output = output or Path(config.output_dir) / "attack-bench"
    rows = attack_runs(config, chosen_attacks, values, chosen_defenses, output)
    title = f"end-to-end runs of {config.data.num_clients} clients, {config.server.rounds} rounds ({output})"
    Console().print(figures_table(title, rows, RUN_COLUMNS))
    atomic_write_json(output / "attack-bench.json", {"config": str(config.output_dir), "figures": rows})
    atomic_write_text(output / "attack-bench.md", figures_markdown(rows, RUN_COLUMNS))
    console.print(f"figures: {output / 'attack-bench.json'}, {output / 'attack-bench.md'}; drops and trigger rates against {rows[0]['reference']}")


def figures_table(title: str, rows: list[dict], columns) -> Table:
    from spearfl.tools.attack_bench import cell

    table = Table(title=title)
    for column, key in columns:
        table.add_column(column, justify="left" if key in ("attack", "defense") else "right")
    for row in rows:
        table.add_row(*(cell(key, row.get(key)) for _, key in columns))
    return table


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@app.command("serve-bench")
def serve_bench_command(
    config_path: Annotated[
        Optional[Path], typer.Argument(metavar="[CONFIG.yaml]", help="Config naming the model and task (default: configs/demo.yaml's defaults).")
    ] = None,
    concurrency: Annotated[str, typer.Option(help="Comma-separated numbers of people asking at once.")] = "1,4,16",
    requests: Annotated[int, typer.Option(min=1, help="Questions each person asks.")] = 4,
    output: Annotated[Optional[Path], typer.Option(help="Also write the figures to this JSON file.")] = None,
    set_: SetOption = None,
) -> None:
    """Measure the device service on this machine: latency and tokens/s per request at each concurrency (batched and
    one at a time), store writes per second, and the time from a round's end to answers from the new adapter."""
    config = load_checked(config_path, set_)
    from spearfl.io import atomic_write_json
    from spearfl.serve.bench import serve_bench

    try:
        levels = [int(part) for part in concurrency.split(",")]
    except ValueError:
        fail(f"--concurrency: comma-separated whole numbers, got {concurrency!r}")
    figures = serve_bench(config, levels, requests)
    table = Table(title=f"device service, {config.model.name}, {torch_threads()} threads")
    for column in ("people at once", "batching", "requests", "first token s (median / p95)", "tokens/s per request (median / p95)", "total tokens/s"):
        table.add_column(column, justify="right")
    for row in figures["load"]:
        table.add_row(
            str(row["concurrency"]), "on" if row["max_batch"] > 1 else "off", str(row["requests"]),
            seconds_pair(row["first_token_s_median"], row["first_token_s_p95"]),
            f"{row['tokens_per_s_median']:.1f} / {row['tokens_per_s_p95']:.1f}", f"{row['total_tokens_per_s']:.1f}",
        )
    console.print(table)
    console.print(f"store: {figures['store_writes_per_s']:.0f} interactions added and judged per second (4 writer threads)")
    console.print("round end to an answer from the new adapter: " + ", ".join(f"{value:.2f} s" for value in figures["adapter_switch_s"]))
    if output is not None:
        atomic_write_json(output, figures)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@app.command("live-demo")
def live_demo_command(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="The simulation to run through the live path.")],
    people: Annotated[int, typer.Option(min=1, help="Simulated people per device, asking at once.")] = 4,
    base_port: Annotated[int, typer.Option(min=1, max=65000, help="Device i listens on 127.0.0.1:BASE_PORT + i.")] = 8101,
    set_: SetOption = None,
) -> None:
    """Run a simulation's rounds through the live path: one device service per client in this process, simulated people
    asking each chosen device its round's questions over HTTP, the server driving the devices; resumable."""
    config = load_checked(config_path, set_)
    from spearfl.serve.live_demo import live_demo

    summary = live_demo(config, people, base_port)
    before, after = summary["before"], summary["after"]
    console.print(f"held-out accuracy through the live path: before {before['accuracy']:.3f} -> after {after['accuracy']:.3f}")


@app.command()
def judge(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="Config naming the answering model and dataset.")],
    judge_model: Annotated[Optional[str], typer.Option(help="Judge model (default: the config's feedback.judge_model, else its model).")] = None,
    questions: Annotated[int, typer.Option(min=1, help="Held-out questions to answer and judge.")] = 200,
    set_: SetOption = None,
) -> None:
    """How far an LLM judge's verdicts agree with the oracle's on the config's held-out questions."""
    config = load_checked(config_path, set_)
    from spearfl.tools.judge import judge_agreement

    name = judge_model or config.feedback.judge_model or config.model.name
    result, _ = judge_agreement(config, name, questions, config.feedback.rubric)
    table = Table(title=f"judge {name} against the oracle, {result.total} answers of {config.model.name} on {config.data.name}")
    table.add_column("")
    table.add_column("judge: right", justify="right")
    table.add_column("judge: wrong", justify="right")
    table.add_row("oracle: right", str(result.both_right), str(result.oracle_only_right))
    table.add_row("oracle: wrong", str(result.judge_only_right), str(result.both_wrong))
    console.print(table)
    kappa = "undefined" if result.kappa is None else f"{result.kappa:.3f}"
    console.print(f"agreement {result.rate:.3f}, Cohen's kappa {kappa}")


@app.command("eval")
def evaluate_command(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="Config naming the model and dataset.")],
    adapter: Annotated[
        Optional[Path], typer.Option(help="Adapter (.safetensors) to evaluate; without it, the base model.")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Evaluate the base model, or an adapter, on the config's held-out set."""
    config = load_checked(config_path, set_)
    from spearfl.io import load_tensors
    from spearfl.lm.models import set_adapter_state
    from spearfl.runtime.evaluation import evaluate
    from spearfl.runtime.setup import build_context, prepare_data

    federation = prepare_data(config)
    context = build_context(config)
    if adapter is not None:
        if not adapter.is_file():
            fail(f"adapter file not found: {adapter}")
        try:
            set_adapter_state(context.model, load_tensors(adapter))
        except ValueError as error:
            fail(f"{adapter}: {error}")
    metrics = evaluate(context.model, context.prompts, federation.heldout, config.eval, progress=True)
    table = Table(title=f"held-out {config.data.name} ({len(federation.heldout)} examples)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


@app.command()
def data(
    leaks: Annotated[bool, typer.Option("--leaks/--no-leaks", help="Measure hint leak rates (slower).")] = True,
    heldout_size: Annotated[int, typer.Option(help="Held-out size used to show the split.")] = 300,
) -> None:
    """List datasets: source, licence, sizes of the client pool and held-out split, hint leak rates.

    Every registered dataset is listed; one whose source this machine lacks is marked unavailable, with the
    reason and how to supply it (running or preparing it stops with that message).
    """
    from spearfl.config import FeedbackConfig
    from spearfl.data import DATASETS, DatasetUnavailable, load_examples
    from spearfl.data.split import split_pool_heldout
    from spearfl.feedback.leaks import leak_report

    table = Table(title="datasets")
    for column in ("name", "kind", "examples", "pool", "held-out", "licence"):
        table.add_column(column)
    loaded, unavailable = {}, {}
    for name, spec in DATASETS.items():
        try:
            examples = load_examples(name)
        except DatasetUnavailable as error:
            unavailable[name] = str(error)
            table.add_row(name, spec.kind, "[yellow]unavailable[/yellow]", "-", "-", spec.licence)
            continue
        loaded[name] = examples
        pool, heldout = split_pool_heldout(examples, min(heldout_size, len(examples) // 2), seed=0)
        table.add_row(name, spec.kind, str(len(examples)), str(len(pool)), str(len(heldout)), spec.licence)
    console.print(table)
    console.print("Sources (no package ships a training split: the pool / held-out split is ours, by seed):")
    for name, spec in DATASETS.items():
        console.print(f"  {name}: {spec.source}", highlight=False)
    if unavailable:
        console.print("[yellow]Not on this machine:[/yellow]")
        for name, reason in unavailable.items():
            console.print(f"  {name}: {reason}", highlight=False)
    if leaks:
        console.print(leak_table(leak_report(loaded, FeedbackConfig().max_hint_sentences)))


LEAK_COLUMNS = {
    "dataset": "dataset",
    "hint_style": "hint style",
    "num_hints": "hints",
    "dropped_fraction": "dropped by filter",
    "matcher_rate": "gold found from hint",
    "chance_rate": "chance",
}


def leak_table(rows: list[dict]) -> Table:
    """Hint styles that produce hints, per dataset: how often the hint alone gives the gold answer away."""
    table = Table(title="hint leak rates (a word-overlap matcher, no model, picks the answer from the hint)")
    for title in LEAK_COLUMNS.values():
        table.add_column(title)
    for row in rows:
        if not row["num_hints"]:
            continue
        style = row["hint_style"] + (" (leaky, opt-in)" if row["leaky"] else "")
        values = {**row, "hint_style": style}
        table.add_row(*(format_value(values[key]) for key in LEAK_COLUMNS))
    return table


def format_value(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


@app.command()
def summarize(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR...", help="Finished run folders, e.g. one per seed.")],
) -> None:
    """Held-out metrics before and after training over several runs: each run, then mean and spread."""
    from spearfl.runtime.run_folder import RunFolder, summarize_runs

    summaries = []
    for run_dir in run_dirs:
        folder = RunFolder(run_dir)
        if not folder.is_complete():
            fail(f"{run_dir} is not a complete run (status: {(folder.read_status() or {}).get('state', 'missing')})")
        summaries.append((str(run_dir), folder.read_summary()))
    console.print(summarize_runs(summaries))


@app.command()
def bench(
    config_path: Annotated[
        Optional[Path], typer.Argument(metavar="[CONFIG.yaml]", help="Config naming the model, dataset and round settings (default: the built-in defaults).")
    ] = None,
    set_: SetOption = None,
    repeats: Annotated[int, typer.Option(min=1, help="Repeats of each throughput measurement.")] = 5,
    round_repeats: Annotated[int, typer.Option(min=1, help="SPEAR and GRPO client rounds to measure (each on other prompts).")] = 3,
    output: Annotated[Path, typer.Option(help="Where to write the report as JSON.")] = Path("runs/bench.json"),
    profile: Annotated[
        bool, typer.Option("--profile", help="Also profile one SPEAR and one GRPO round with torch.profiler (operators by own time; in the JSON and beside it as .txt).")
    ] = False,
    preset: Annotated[
        Optional[str], typer.Option(help="Measure a named setting instead of CONFIG: demo (configs/demo.yaml) or paper (the paper's LoRA setting, configs/bench/paper_lora.yaml).")
    ] = None,
) -> None:
    """Measure this machine's matmul ceiling, the model's prefill, decode and LoRA training speed against it,
    a SPEAR and a GRPO client round on the same prompts (time, and peak memory of generation and of training),
    a TAP round and TAP's stage 2 with two adapters on the device, upload sizes; print and save them."""
    from spearfl.tools.bench import (
        BenchSettings,
        preset_config,
        profile_rounds,
        report_tables,
        run_bench,
    )
    from spearfl.lm.memory import resident_mb

    baseline = resident_mb()
    if preset is not None:
        if config_path is not None:
            raise UserError("give a CONFIG or a --preset, not both")
        config_path = preset_config(preset)
    config = load_checked(config_path, set_)
    from spearfl.io import atomic_write_json, atomic_write_text
    from spearfl.runtime.setup import build_context, prepare_data

    context = build_context(config)
    # TAP's round reads a validation split: the client's pool as a TAP run cuts it, for every measurement alike
    federation = prepare_data(config.model_copy(update={"personal": config.personal.model_copy(update={"method": "tap"})}))
    examples, validation = federation.clients[0], federation.client_validation[0]
    settings = BenchSettings(repeats=repeats, round_repeats=round_repeats)
    with console.status("measuring") as status:
        report = run_bench(context, examples, settings, baseline, progress=lambda step: status.update(f"measuring {step}"),
                           validation=validation)
    report["config"] = str(config_path) if config_path else "(defaults)"
    for table in report_tables(report):
        console.print(table)
    if profile:
        with console.status("profiling a SPEAR and a GRPO round"):
            profiles = profile_rounds(context, examples)
        text = "\n\n".join(f"{algorithm}: one client round, {entry['seconds']:.2f} s\n{entry.pop('table')}" for algorithm, entry in profiles.items())
        report["profile"] = profiles
        atomic_write_text(output.with_suffix(".profile.txt"), text)
        console.print(text)
    atomic_write_json(output, report)
    console.print(f"report: {output}")


@app.command("bench-scaling")
def bench_scaling(
    config_path: Annotated[
        Optional[Path], typer.Argument(metavar="[CONFIG.yaml]", help="The setting each point changes one field of (default: --preset paper).")
    ] = None,
    preset: Annotated[Optional[str], typer.Option(help="A bench preset instead of CONFIG: demo or paper.")] = None,
    axis: Annotated[
        Optional[list[str]], typer.Option(help="Measure only this axis (repeatable): prompts, rows_per_step, lora_layers, model.")
    ] = None,
    output: Annotated[Path, typer.Option(help="Folder for the points, the table and the plot (resumable).")] = Path("runs/scaling"),
) -> None:
    """Size a device: one SPEAR client round's time and peak memory (generation, training) against prompts per round,
    rows per step, LoRA layers and model size, each point in a fresh process; saved as each finishes, so a rerun
    measures only what is missing. Writes scaling.json, scaling.md and scaling.png."""
    from spearfl.tools.bench import preset_config
    from spearfl.tools.scaling import AXES, rich_table, run_scaling

    if config_path is not None and preset is not None:
        raise UserError("give a CONFIG or a --preset, not both")
    axes = tuple(axis or AXES)
    unknown = [name for name in axes if name not in AXES]
    if unknown:
        raise UserError(f"unknown axis {', '.join(unknown)}: choose from {', '.join(AXES)}")
    config_path = config_path if config_path is not None else preset_config(preset or "paper")
    load_checked(config_path, [])
    with console.status("measuring") as status:
        report = run_scaling(config_path, output, axes, progress=lambda point: status.update(f"measuring {point} (a client round in a fresh process)"))
    console.print(rich_table(report))
    for reason in report["skipped"]:
        console.print(f"left out: {reason}")
    console.print(f"table: {output / 'scaling.md'}  plot: {output / 'scaling.png'}")


@app.command("client-worker")
def client_worker(
    port: Annotated[int, typer.Option(help="Port to listen on; give it to the SuperNode as --node-config \"worker='127.0.0.1:PORT'\".")] = 7301,
    host: Annotated[str, typer.Option(help="Interface to listen on; beyond 127.0.0.1 an access token is required.")] = "127.0.0.1",
    token: Annotated[
        Optional[str], typer.Option(help="The server's token the ClientApp must send with work orders (Authorization: Bearer ...); default: $SPEARFL_SERVER_TOKEN.")
    ] = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    config: Annotated[
        Optional[Path], typer.Option(help="This device's own config: its data, feedback verifiers, privacy and limits, which no work order sets. Without it the run's config stands in, as in a simulation.")
    ] = None,
) -> None:
    """Keep one device's base model loaded across Flower rounds, for its SuperNode's ClientApp (see README).

    Flower starts a fresh ClientApp process for every message, so the model would otherwise load every round.
    Run one worker beside each SuperNode; it loads the model with the first round and serves until stopped.
    """
    import logging

    from spearfl.runtime.worker import serve
    from spearfl.serve.device import SERVER_TOKEN_VARIABLE, access_token

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    required, tls = access_token(host, token, SERVER_TOKEN_VARIABLE, "--token"), tls_files(tls_cert, tls_key)
    try:
        serve(host, port, required, None if config is None else str(config), tls=tls)
    except OSError as error:
        fail(f"cannot listen on {host}:{port}: {error}")


@app.command()
def prepare() -> None:
    """Convert the default model and cache the packaged datasets once (later runs start fast).

    A dataset whose source this machine cannot supply is reported and skipped: the others, and the
    default task, still work; a run that names the skipped one stops with the same message.
    """
    from spearfl.data import DATASETS, DatasetUnavailable, load_examples
    from spearfl.lm.models import DEFAULT_MODEL, load_tokenizer, resolve_model_path

    resolve_model_path(DEFAULT_MODEL)
    load_tokenizer(DEFAULT_MODEL)
    for name in DATASETS:
        try:
            console.print(f"{name}: {len(load_examples(name))} examples cached")
        except DatasetUnavailable as error:
            console.print(f"[yellow]{name}: not cached:[/yellow] {error}", highlight=False)


if __name__ == "__main__":
    app()
