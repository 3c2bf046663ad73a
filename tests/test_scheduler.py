"""Scheduler, allocator and engine bookkeeping without the model: a fake runner stands in for the device, so
these tests compile nothing."""

import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msjax.config import DeploymentPlan, EngineConfig
from msjax.engine.engine import Engine
from msjax.engine.sampling_params import InvalidRequestError, SamplingParams
from msjax.engine.sequence import Status
from msjax.errors import ConfigError
from msjax.kv_cache import PageAllocator
from msjax.runtime.runner import NoDeviceRunner
from msjax.runtime.sampler import Sampled
from tests.model_utils import tiny_config

VOCAB = 61


class FakeRunner(NoDeviceRunner):
    """Samples token (position of the sequence's last token * 7) % vocab: deterministic, batch-independent."""

    def __init__(self):
        self.batches = []

    def sample(self, batch):
        self.batches.append(batch)
        last_positions = batch.positions[batch.logit_rows]
        tokens = ((last_positions + 1) * 7 % VOCAB).astype(np.int32)
        n = len(tokens)
        return Sampled(tokens, np.zeros(n, np.float32), np.zeros((n, batch.num_logprobs), np.int32),
                       np.zeros((n, batch.num_logprobs), np.float32))


def make_engine(plan=None, **options) -> Engine:
    cfg = dict(page_size=4, num_pages=16, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=40)
    cfg.update(options)
    model = types.SimpleNamespace(cfg=tiny_config(vocab_size=VOCAB, max_position_embeddings=64))
    return Engine(model, EngineConfig(**cfg), plan=plan, runner=FakeRunner(), eos_token_ids=())


def run_all(engine: Engine, max_steps: int = 2000) -> dict[str, list[int]]:
    """Step until every request finishes; a livelock (steps that never finish anything) fails, not hangs."""
    out: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return out
        for d in engine.step():
            out.setdefault(d.request_id, []).extend(d.token_ids)
    raise AssertionError(f"not finished after {max_steps} steps: {engine.num_running()} running, "
                         f"{engine.num_waiting()} waiting")


def check_pages(engine: Engine) -> None:
    """Every used page belongs to exactly one running sequence of its replica, and covers its cached tokens."""
    for r in engine.replicas:
        owned = [p for s in r.scheduler.running for p in s.pages]
        assert len(owned) == len(set(owned)) == r.allocator.num_used
        for s in r.scheduler.running:
            assert len(s.pages) * engine.config.page_size >= s.num_computed
        assert all(not s.pages for s in r.scheduler.waiting)


def no_leak(engine: Engine) -> bool:
    return engine.num_free_pages() == engine.num_total_pages()


def test_allocator_accounting():
    a = PageAllocator(4)
    pages = a.allocate(3)
    assert a.num_free == 1 and not a.can_allocate(2)
    a.free(pages[:2])
    assert a.num_free == 3
    with pytest.raises(ValueError, match="not allocated"):
        a.free(pages[:1])


def test_long_prompt_is_prefilled_in_chunks():
    engine = make_engine()
    engine.add_request("a", list(range(1, 20)), SamplingParams(max_tokens=2))
    engine.step()
    batch = engine.runner.batches[-1]
    assert not batch.decode and (batch.positions >= 0).sum() == 8  # the token budget
    run_all(engine)
    assert engine.stats.num_partial_prefill_chunks == 2  # 19 tokens = 8 + 8 + 3


def test_admission_waits_for_pages_and_seq_limit():
    engine = make_engine(max_num_seqs=2, max_num_batched_tokens=40)
    for i in range(3):
        engine.add_request(str(i), [1, 2, 3], SamplingParams(max_tokens=3))
    engine.step()
    assert engine.num_running() == 2 and engine.num_waiting() == 1


def test_preemption_takes_the_latest_and_recomputes_exactly():
    # 16 pages of 4 tokens: four 12-token prompts growing to 28 tokens cannot all stay resident
    alone = {}
    for i in range(4):
        e = make_engine(max_num_batched_tokens=16)
        e.add_request(str(i), [i + 1] * 12, SamplingParams(max_tokens=16))
        alone.update(run_all(e))
    engine = make_engine(max_num_batched_tokens=16)
    for i in range(4):
        engine.add_request(str(i), [i + 1] * 12, SamplingParams(max_tokens=16))
    together = run_all(engine)
    assert engine.stats.num_preemptions > 0
    assert together == alone
    assert no_leak(engine)


def test_abort_frees_pages_and_reports():
    engine = make_engine()
    engine.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=30))
    engine.add_request("b", [1, 2], SamplingParams(max_tokens=30))
    engine.step()
    free = engine.num_free_pages()
    assert engine.abort("a") and not engine.abort("nope")
    assert engine.num_free_pages() > free
    deltas = engine.step()
    assert any(d.request_id == "a" and d.finish_reason == "abort" for d in deltas)
    assert set(run_all(engine)) == {"b"}
    assert no_leak(engine)


def test_stop_token_and_length():
    engine = make_engine()
    # the fake runner samples (pos + 1) * 7 % 61: after a 3-token prompt the first token is 21
    engine.add_request("stop", [5, 6, 7], SamplingParams(max_tokens=10, stop_token_ids=(28,)))
    engine.add_request("len", [5, 6, 7], SamplingParams(max_tokens=3))
    out = run_all(engine)
    assert out["stop"] == [21, 28] and out["len"] == [21, 28, 35]


def test_context_limit_finishes_with_length():
    engine = make_engine(max_model_len=10)
    engine.add_request("a", [1] * 8, SamplingParams(max_tokens=100))
    assert len(run_all(engine)["a"]) == 2


@pytest.mark.parametrize("prompt, sampling, field", [
    ([], None, "prompt"),
    ([1] * 40, None, "prompt"),  # no room within max_model_len=40
    ([1, 99], None, "prompt"),  # outside the vocabulary
    ("text", None, "prompt"),  # no tokenizer
    ([1], "greedy", "sampling"),
])
def test_bad_requests_are_refused_and_others_keep_going(prompt, sampling, field):
    engine = make_engine()
    engine.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("bad", prompt, sampling)
    assert err.value.field == field
    with pytest.raises(InvalidRequestError, match="request_id"):
        engine.add_request("ok", [1], None)
    assert run_all(engine)["ok"] == [21, 28, 35, 42]


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(seed=-1), "seed"),
    (dict(logprobs=21), "logprobs"), (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-2]), "stop_token_ids"),
])
def test_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field and isinstance(err.value, ValueError)


@pytest.mark.parametrize("field, value, expected", [
    ("max_tokens", "8", "must be an integer, got str '8'"), ("max_tokens", 2.5, "must be an integer, got float"),
    ("max_tokens", True, "must be an integer, got bool"), ("temperature", "abc", "must be a number, got str 'abc'"),
    ("temperature", None, "must be a number, got NoneType"), ("top_p", [1], "must be a number, got list"),
    ("top_k", 1.0, "must be an integer, got float"), ("seed", "7", "must be an integer, got str"),
    ("logprobs", 2.0, "must be an integer, got float"),
])
def test_sampling_params_type_errors_name_the_expected_type(field, value, expected):
    """A value of the wrong type is reported as such, not as out of range."""
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value})
    assert err.value.field == field and expected in str(err.value) and "must be >=" not in str(err.value)


@pytest.mark.parametrize("field, value, expected", [
    ("max_tokens", 0, "must be > 0, got 0"), ("temperature", -1, "must be >= 0, got -1"),
    ("temperature", float("nan"), "must be >= 0, got nan"), ("top_p", 0, "must be in (0, 1], got 0"),
    ("seed", 2**32, "must be in [0, 2**32)"), ("logprobs", 21, "must be in [0, 20], got 21"),
])
def test_sampling_params_range_errors(field, value, expected):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value})
    assert err.value.field == field and expected in str(err.value)


def test_engine_config_must_hold_one_sequence():
    with pytest.raises(ConfigError, match="num_pages"):
        make_engine(num_pages=4, max_model_len=40)


def test_prompts_that_fit_only_one_at_a_time_both_finish():
    """Found by hypothesis: two 24-token prompts, 7 pages each of 10, used to preempt each other's prefill
    forever while the decode step they held up never ran."""
    engine = make_engine(num_pages=10)
    for rid in "ab":
        engine.add_request(rid, [5] * 24, SamplingParams(max_tokens=2))
    out = run_all(engine, max_steps=100)
    assert {rid: len(t) for rid, t in out.items()} == {"a": 2, "b": 2}
    assert no_leak(engine)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "abort", "step", "step"]), st.integers(1, 30),
                          st.integers(1, 12)), min_size=1, max_size=40))
def test_no_page_leaks(ops):
    engine = make_engine(num_pages=10)
    ids = []
    for n, (op, a, b) in enumerate(ops):
        if op == "add":
            engine.add_request(f"r{n}", [1 + a % 50] * a, SamplingParams(max_tokens=b))
            ids.append(f"r{n}")
        elif op == "abort" and ids:
            engine.abort(ids[a % len(ids)])
        else:
            engine.step()
        check_pages(engine)
    run_all(engine)
    assert no_leak(engine)
    assert engine.num_running() == 0 and engine.num_waiting() == 0


def test_data_parallel_replicas_and_micro_batches():
    """Requests spread over attention replicas by free pages; each replica's batch splits into micro-batches;
    the tokens are those of a single replica running everything."""
    from msjax.config import DeploymentPlan
    single = make_engine(num_pages=40, max_num_seqs=8, max_num_batched_tokens=64)
    plan = DeploymentPlan(attention_nodes=2, expert_nodes=1, micro_batches=3)
    split = make_engine(plan=plan, num_pages=20, max_num_seqs=8, max_num_batched_tokens=64)
    for engine in (single, split):
        for i in range(7):
            engine.add_request(str(i), [i + 1] * (3 + i), SamplingParams(max_tokens=5 + i))
    assert [len(r.scheduler.waiting) for r in split.replicas] == [4, 3]
    first = {d.request_id: d.token_ids for d in split.step()}
    # prefill: replica 0 has 4 sequences in 3 micro-batches, replica 1 has 3 in 3
    assert len(split.runner.batches) == 6 and len(first) == 7
    rest = run_all(split)
    assert {rid: first[rid] + rest.get(rid, []) for rid in first} == run_all(single)
    assert no_leak(split)
    assert split.micro_batches == 3


def test_m_larger_than_the_running_sequences():
    from msjax.config import DeploymentPlan
    engine = make_engine(plan=DeploymentPlan(micro_batches=4))
    engine.add_request("only", [1, 2, 3], SamplingParams(max_tokens=3))
    assert run_all(engine)["only"] == [21, 28, 35]
    assert all((b.positions >= 0).any() for b in engine.runner.batches)  # no empty micro-batch ran


def test_metrics_reads_do_not_take_the_balancers_load():
    """The serving loop reads the expert load for its metrics between steps; `rebalance` must still place for
    every token routed since the previous rebalance."""
    class CountingRunner(FakeRunner):
        def __init__(self):
            super().__init__()
            self.routed, self.placed = np.zeros(4, np.int64), None

        def step(self, batches):
            self.routed += np.array([8, 1, 1, 0]) * sum(len(b.positions) for node in batches for b in node)
            return super().step(batches)

        def expert_load(self):
            load, self.routed = self.routed, np.zeros(4, np.int64)
            return load

        def set_placement(self, nodes, shares=None):
            self.placed = nodes

    model = types.SimpleNamespace(cfg=tiny_config(vocab_size=VOCAB, max_position_embeddings=64))
    runner = CountingRunner()
    engine = Engine(model, EngineConfig(page_size=4, num_pages=16, max_num_seqs=4, max_num_batched_tokens=8,
                                        max_model_len=40), plan=DeploymentPlan(1, 1, 2, 1, 1), runner=runner,
                    eos_token_ids=())
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4))
    seen = np.zeros(4, np.int64)
    while engine.has_unfinished():
        engine.step()
        seen += engine.collect_expert_load()  # what the metrics exporter does
    assert seen[0] > 0
    from msjax.balance import place_experts
    placement = engine.rebalance(redundancy=1)
    assert placement.nodes == place_experts(seen, 2, redundancy=1).nodes  # the whole window, not what was left
    assert engine.rebalance().nodes == place_experts(np.zeros(4, np.int64), 2).nodes  # a new window


def test_decode_buckets_pad_by_at_most_a_third_above_eight():
    from msjax.engine.batch import decode_bucket, decode_buckets
    assert decode_buckets(64) == [2, 4, 8, 12, 16, 24, 32, 48, 64]  # one sequence runs as two rows
    assert decode_buckets(20) == [2, 4, 8, 12, 16, 20]  # the cap is a size of its own
    assert decode_buckets(1) == [2]
    assert [decode_bucket(n, 64) for n in (3, 9, 13, 22, 40, 64)] == [4, 12, 16, 24, 48, 64]
    for cap in (1, 7, 16, 20, 64, 100):
        for n in range(1, cap + 1):
            size = decode_bucket(n, cap)
            assert n <= size <= max(cap, 2) and size in decode_buckets(cap)
            if 8 < size < cap:  # under a third of the rows are padding (powers of two alone: up to half)
                assert size - n < size / 3, (n, size)
