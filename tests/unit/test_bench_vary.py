"""``mltasks bench gateway --vary SECTION.KEY=V1,V2 --rounds N``: the options, the order the
runs alternate in, and the comparison's arithmetic, on fake runs (no server is started)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from mltasks.bench import BenchError
from mltasks.bench.cli_args import rounds_arg, vary_arg
from mltasks.bench.report import markdown, ratios
from mltasks.bench.responders import service_responder
from mltasks.bench.service import ServiceSettings, bench_config, experience_enabled
from mltasks.bench.vary import Vary, check_configs, compare, markdown_lines, schedule
from mltasks.cli import build_parser

GATEWAY = ("bench", "gateway", "--database-url", "postgresql://127.0.0.1:1/mltasks_bench_x")


def _parse(*options: str) -> argparse.Namespace:
    return build_parser().parse_args([*GATEWAY, *options])


# -- the options -------------------------------------------------------------------------------


def test_vary_and_rounds_parse() -> None:
    args = _parse(
        *("--vary", "experience.enabled=false,true", "--rounds", "6"),
        *("--set", "inference.max_waiting_batches=2"),
    )
    assert args.vary == Vary("experience", "enabled", (False, True), ("false", "true"))
    assert args.rounds == 6
    assert args.overrides == [("inference", "max_waiting_batches", 2)]
    # Values are YAML scalars, as --set reads them; the texts name the runs.
    three = vary_arg("inference.max_waiting_batches= 1, 2 ,4")
    assert three.values == (1, 2, 4) and three.texts == ("1", "2", "4")
    assert three.run_name("2") == "service inference.max_waiting_batches=2"
    # Without them, a gateway run is what it was: one round, no variants.
    plain = _parse()
    assert plain.vary is None and plain.rounds == 1


@pytest.mark.parametrize(
    ("option", "text", "message"),
    [
        ("--vary", "enabled=false,true", "expected SECTION.KEY=V1,V2"),
        ("--vary", "experience.enabled", "expected SECTION.KEY=V1,V2"),
        ("--vary", "experience.enabled=false", "two values or more"),
        ("--vary", "experience.enabled=false,", "two values or more"),
        ("--vary", "experience.enabled=false,False", "'False' is given twice"),
        ("--vary", "models.fusion=[1,{", "'[1' is not YAML"),
        ("--rounds", "0", "rounds must be at least 1"),
        ("--rounds", "two", "expected a number of rounds"),
    ],
)
def test_bad_vary_or_rounds_fails_at_the_start_naming_it(
    capsys: pytest.CaptureFixture[str], option: str, text: str, message: str
) -> None:
    with pytest.raises(SystemExit) as done:
        _parse(option, text)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"mltasks bench gateway: error: argument {option}"), err
    assert message in err, err
    if option == "--vary":
        assert repr(text) in err, err


def test_true_and_one_are_two_values() -> None:
    """YAML's ``true`` equals Python's 1, but they are different config values."""
    assert vary_arg("a.b=true,1").values == (True, 1)
    with pytest.raises(argparse.ArgumentTypeError, match="given twice"):
        vary_arg("a.b=1,1.0,1")
    assert rounds_arg("3") == 3


def test_vary_without_the_service_is_refused() -> None:
    from mltasks.bench.cli_load import gateway_command

    args = _parse("--floor", "--no-service", "--vary", "experience.enabled=false,true")
    with pytest.raises(BenchError, match="drop --no-service"):
        gateway_command(args)


def _settings(tmp_path: Path, **options: Any) -> ServiceSettings:
    """Settings only: nothing here starts or connects."""
    return ServiceSettings(
        database_url="postgresql://127.0.0.1:1/mltasks_bench_x",
        redis_url="redis://127.0.0.1:1",
        models_dir=tmp_path,
        work_dir=tmp_path,
        log_dir=tmp_path,
        **options,
    )


def test_each_variant_carries_its_value_on_top_of_set(tmp_path: Path) -> None:
    vary = vary_arg("experience.enabled=false,true")
    base = _settings(
        tmp_path, level=3, overrides=(("experience", "enabled", True), ("inference", "x", 1))
    )
    off, on = vary.settings(base)
    assert off.overrides[-1] == ("experience", "enabled", False)
    assert off.describe()["set"] == {"experience.enabled": False, "inference.x": 1}
    assert bench_config(off)["experience"]["enabled"] is False
    assert bench_config(on)["experience"]["enabled"] is True
    # The recorder runs where the last setting, the variant's, says so.
    assert (experience_enabled(off), experience_enabled(on)) == (False, True)
    assert (off.level, off.label()) == (3, base.label())
    names = [
        service_responder(s, vary.run_name(t)).name
        for s, t in zip((off, on), vary.texts, strict=True)
    ]
    assert names == ["service experience.enabled=false", "service experience.enabled=true"]
    assert vary.describe(6) == {
        "key": "experience.enabled",
        "values": ["false", "true"],
        "runs": names,
        "rounds": 6,
    }


def test_a_value_the_service_rejects_stops_the_run_at_the_start(tmp_path: Path) -> None:
    """Checked as the service will read each variant's config (a fresh interpreter, no
    server), before the first run: one line naming the option and the key."""
    good = vary_arg("experience.enabled=false,true")
    check_configs(good, good.settings(_settings(tmp_path)), tmp_path)
    typo = vary_arg("experience.enabld=false,true")
    with pytest.raises(BenchError) as err:
        check_configs(typo, typo.settings(_settings(tmp_path)), tmp_path)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("--vary experience.enabld=false: ") and "unknown key" in line


# -- the order of the runs ---------------------------------------------------------------------


def test_rounds_alternate_and_reverse_the_variants_every_other_round() -> None:
    assert schedule(["floor", "model floor"], ["A", "B"], 3) == [
        (1, "floor"),
        (1, "model floor"),
        (1, "A"),
        (1, "B"),
        (2, "floor"),
        (2, "model floor"),
        (2, "B"),
        (2, "A"),
        (3, "floor"),
        (3, "model floor"),
        (3, "A"),
        (3, "B"),
    ]
    assert schedule([], ["A", "B", "C"], 2) == [
        *((1, "A"), (1, "B"), (1, "C")),
        *((2, "C"), (2, "B"), (2, "A")),
    ]
    # The runs as before --rounds: the floors, then the service, once.
    assert schedule(["floor"], ["service"], 1) == [(1, "floor"), (1, "service")]


# -- the comparison ----------------------------------------------------------------------------


def _run(
    responder: str,
    decisions: int,
    elapsed_s: float,
    p99: float,
    in_time: int,
    *,
    rnd: int,
    variant: str | None = None,
    clients: int = 8,
) -> dict[str, Any]:
    run: dict[str, Any] = {
        "responder": responder,
        "clients": clients,
        "elapsed_s": elapsed_s,
        "decisions": decisions,
        "decisions_per_s": round(decisions / elapsed_s, 1),
        "answered_in_time": in_time,
        "in_time_share": round(in_time / decisions, 4),
        "latency_ms": {"p50": 9.0, "p95": p99 - 1, "p99": p99, "max": p99 + 5, "mean": 9.5},
        "share_255": 0.0,
        "parse_failures": 0,
        "errors": 0,
        "actions": {"3": in_time},
        "round": rnd,
    }
    if variant is not None:
        run["variant"] = variant
    return run


OFF, ON = "service experience.enabled=false", "service experience.enabled=true"


def _runs() -> list[dict[str, Any]]:
    """Three rounds at 8 clients, a floor first in each, the variants' order alternating;
    ``true`` failed in round 3."""
    return [
        _run("floor", 16000, 10.0, 9.0, 16000, rnd=1),
        _run(OFF, 5000, 10.0, 18.0, 3000, rnd=1, variant="false"),
        _run(ON, 4500, 10.0, 21.0, 2000, rnd=1, variant="true"),
        _run("floor", 15000, 10.0, 9.5, 15000, rnd=2),
        _run(ON, 5000, 10.0, 19.5, 2500, rnd=2, variant="true"),
        _run(OFF, 5400, 12.0, 19.0, 2700, rnd=2, variant="false"),
        _run("floor", 16500, 10.0, 8.5, 16500, rnd=3),
        _run(OFF, 5200, 10.0, 20.0, 2600, rnd=3, variant="false"),
        {"responder": ON, "clients": 8, "failed": "the worker died", "round": 3, "variant": "true"},
    ]


def test_compare_sums_rounds_takes_medians_and_ratios() -> None:
    [at8] = compare(_runs(), ("false", "true"))
    off, on = at8["variants"]
    assert at8["clients"] == 8
    # All of a variant's decisions over all of its time: 15600 / 32 s, not the mean of
    # its rounds' rates (490.0).
    assert off == {
        "value": "false",
        "runs": 3,
        "failed": 0,
        "decisions": 15600,
        "elapsed_s": 32.0,
        "decisions_per_s": 487.5,
        "in_time_share": round(8300 / 15600, 4),
        "p99_median_ms": 19.0,
        "decisions_per_s_ratio": 1.0,
        "p99_diff_ms": 0.0,
        "p99_diff_pct": 0.0,
    }
    assert on == {
        "value": "true",
        "runs": 2,
        "failed": 1,
        "decisions": 9500,
        "elapsed_s": 20.0,
        "decisions_per_s": 475.0,
        "in_time_share": round(4500 / 9500, 4),
        "p99_median_ms": 20.25,  # the median of two: their mean
        "decisions_per_s_ratio": round(475.0 / 487.5, 3),
        "p99_diff_ms": 1.25,
        "p99_diff_pct": round(100 * 1.25 / 19.0, 1),
    }
    assert at8["rounds"] == [
        {
            "round": 1,
            "order": ["false", "true"],
            "decisions_per_s": {"false": 500.0, "true": 450.0},
            "p99_ms": {"false": 18.0, "true": 21.0},
            "ratio": {"true": 0.9},
        },
        {
            "round": 2,
            "order": ["true", "false"],
            "decisions_per_s": {"false": 450.0, "true": 500.0},
            "p99_ms": {"false": 19.0, "true": 19.5},
            "ratio": {"true": 1.111},
        },
        {
            "round": 3,
            "order": ["false", "true"],
            "decisions_per_s": {"false": 520.0, "true": None},
            "p99_ms": {"false": 20.0, "true": None},
            "ratio": {"true": None},
        },
    ]


def test_compare_keeps_client_counts_apart() -> None:
    runs = [
        _run(OFF, 100, 10.0, 5.0, 100, rnd=1, variant="false", clients=1),
        _run(ON, 90, 10.0, 6.0, 90, rnd=1, variant="true", clients=1),
        *_runs(),
    ]
    one, eight = compare(runs, ("false", "true"))
    assert (one["clients"], eight["clients"]) == (1, 8)
    assert one["variants"][1]["decisions_per_s_ratio"] == 0.9
    assert eight["variants"][0]["decisions"] == 15600


def test_ratios_against_the_floors_per_round_leave_the_variants_out() -> None:
    assert ratios(_runs()) == []  # variants only: compared in their own section
    service = [
        _run("floor", 16000, 10.0, 9.0, 16000, rnd=1),
        _run("service", 5000, 10.0, 18.0, 3000, rnd=1),
        _run("floor", 15000, 10.0, 10.0, 15000, rnd=2),
        _run("service", 6000, 10.0, 20.0, 3000, rnd=2),
    ]
    rows = ratios(service)
    assert [(q["round"], q["decisions_per_s_ratio"], q["p99_ratio"]) for q in rows] == [
        (1, round(5000 / 16000, 3), 2.0),
        (2, 0.4, 2.0),
    ]
    # Without --rounds the runs carry no round, and neither do their ratios.
    for run in service[:2]:
        del run["round"]
    [row] = ratios(service[:2])
    assert "round" not in row and row["floor"] == "floor"


EXPECTED = """\
Variants of `experience.enabled` (`--vary`), 3 rounds at each client count, the variants' \
order reversed every other round. decisions/s: the decisions of all of a variant's rounds over \
the sum of their durations; p99: the median of its rounds' p99; in time: of all its decisions. \
Against the first value, false.

| clients | experience.enabled | runs | decisions | decisions/s | in time | p99 ms (median) \
| decisions/s / false | p99 - false ms | p99 - false |
| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| 8 | false | 3 | 15600 | 487.5 | 53.2% | 19.0 | - | - | - |
| 8 | true | 2 (1 failed) | 9500 | 475.0 | 47.4% | 20.25 | 0.974 | +1.25 | +6.6% |

Round by round (a failed run: n/a):

| clients | round | order | false: decisions/s | false: p99 ms | true: decisions/s \
| true: p99 ms | true / false |
| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |
| 8 | 1 | false, true | 500.0 | 18.0 | 450.0 | 21.0 | 0.900 |
| 8 | 2 | true, false | 450.0 | 19.0 | 500.0 | 19.5 | 1.111 |
| 8 | 3 | false, true | 520.0 | 20.0 | n/a | n/a | n/a |"""


def _report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    vary = vary_arg("experience.enabled=false,true")
    return {
        "started_at": "2026-12-07T10:00:00+00:00",
        "duration_s": 10.0,
        "timeout_ms": 15,
        "poll_ms": 2,
        "literal_sql": True,
        "client_processes": 2,
        "service": {"level": 3, "caching": True, "pool": "solo", "concurrency": 2},
        "machine": {
            "nproc": 2,
            "cpu_model": "test",
            "memory_gb": 1.0,
            "os": "Linux",
            "python": "3.11",
        },
        "postgres": "15",
        "runs": runs,
        "ratios": ratios(runs),
        "rounds": 3,
        "vary": vary.describe(3),
        "variants": compare(runs, vary.texts),
    }


def test_the_report_compares_the_variants() -> None:
    report = _report(_runs())
    assert "\n".join(markdown_lines(report)) == EXPECTED
    md = markdown(report)
    assert EXPECTED in md
    # The runs' table says which round each run was.
    assert "| responder | clients | round | decisions/s |" in md
    assert f"| {OFF} | 8 | 2 | 450.0 | 50.0% |" in md
    assert f"| {ON} | 8 | 3 | failed: the worker died |" in md
    # Without --vary, no such section, and the runs' table has no round column.
    plain = _report([{k: v for k, v in r.items() if k != "round"} for r in _runs()[:1]])
    del plain["vary"], plain["variants"], plain["rounds"]
    md = markdown(plain)
    assert "Variants of" not in md and "| round |" not in md
    assert "| responder | clients | decisions/s |" in md


# -- the command's wiring, its servers and runs faked ----------------------------------------


def _gateway(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *options: str
) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``gateway_command`` with every run faked: which runs it made (name, clients) and the
    report it wrote."""
    import json
    from collections.abc import Iterator
    from contextlib import contextmanager

    from mltasks.bench import cli_load

    made: list[tuple[str, int]] = []

    def fake_run(name: str, start: Any, spec: Any, *_: Any) -> dict[str, Any]:
        made.append((name, spec.clients))
        run = _run(name, 1000 + len(made), 10.0, 10.0 + len(made), 500, rnd=0)
        del run["round"]  # the command numbers the rounds
        return run | {"clients": spec.clients}

    @contextmanager
    def fake_workspace(args: argparse.Namespace) -> Iterator[tuple[Path, Path]]:
        yield tmp_path, tmp_path

    monkeypatch.setattr(cli_load, "recreate_database", lambda url: None)
    monkeypatch.setattr(cli_load, "workspace", fake_workspace)
    monkeypatch.setattr(cli_load, "ours_markers_for", lambda *a: ())
    monkeypatch.setattr(cli_load, "_guarded_run", fake_run)
    monkeypatch.setattr(cli_load, "server_version", lambda url: "15")
    monkeypatch.setattr(cli_load, "gateway_plots", lambda report, out: [])
    args = _parse("--out", str(tmp_path / "out"), "--duration", "1", *options)
    assert cli_load.gateway_command(args) == 0
    return made, json.loads((tmp_path / "out" / "report.json").read_text())


def test_gateway_runs_the_variants_in_alternating_rounds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    made, report = _gateway(
        monkeypatch,
        tmp_path,
        *("--clients", "1,8", "--floor", "--rounds", "2"),
        *("--vary", "experience.enabled=false,true"),
    )
    one_count = [("floor", 1), (OFF, 1), (ON, 1), ("floor", 1), (ON, 1), (OFF, 1)]
    assert made == one_count + [(name, 8) for name, _ in one_count]
    assert [r["round"] for r in report["runs"]] == [1, 1, 1, 2, 2, 2] * 2
    assert [r.get("variant") for r in report["runs"][:3]] == [None, "false", "true"]
    assert report["vary"]["runs"] == [OFF, ON] and report["rounds"] == 2
    assert [c["clients"] for c in report["variants"]] == [1, 8]
    assert report["ratios"] == []  # the variants are compared with each other
    assert "Variants of `experience.enabled`" in (tmp_path / "out" / "report.md").read_text()


def test_gateway_without_vary_or_rounds_runs_as_before(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    made, report = _gateway(monkeypatch, tmp_path, "--clients", "1,8", "--floor")
    assert made == [("floor", 1), ("service", 1), ("floor", 8), ("service", 8)]
    assert not any("round" in r or "variant" in r for r in report["runs"])
    assert not {"vary", "variants", "rounds"} & set(report)
    assert [(q["clients"], q["floor"]) for q in report["ratios"]] == [(1, "floor"), (8, "floor")]
