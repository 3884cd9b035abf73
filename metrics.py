"""The service's Prometheus metrics, served on BentoML's /metrics route: every name, label and bucket.

`bentoml serve` runs the API workers and the engine as separate processes, all with
PROMETHEUS_MULTIPROC_DIR=$BENTOML_HOME/prometheus_multiproc_dir (emptied when a server starts).
prometheus_client then keeps each process's values in files there, and /metrics, answered by any
API worker, merges the files: counters and histograms add up across processes (and across engine
restarts). Every gauge but one is written by the engine alone, so it reads as the value written last
(`mostrecent`): a sum would go on counting a crashed engine's last value after its restart. The
exception is a provider's circuit state, which each API worker writes for its own circuit breaker: it
reads as the most open of them (`max`).

Label values are bounded: `model` takes only ids of models loaded from the store (or, on the
fallback counter, named in the providers file), `provider` and `chain` only ids from the providers
file, `error_type` only the error types the API answers with (anything else counts as `other`),
`device` the CUDA devices present. Request text never becomes a label.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

PREFIX = "ai_model"
OTHER = "other"
LATEST = "mostrecent"  # the multiprocess mode of every gauge, see above

LOAD_BUCKETS_S = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
GENERATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
FIRST_TOKEN_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
PER_TOKEN_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
QUEUE_WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
EXPECTED_FINISH_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
STEP_SEQUENCES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# The engine: models.
LOAD_SECONDS = Histogram(
    f"{PREFIX}_load_seconds", "Seconds to load a model, from the store to a running batch scheduler", ["model"],
    buckets=LOAD_BUCKETS_S,
)
LOADED_MODELS = Gauge(f"{PREFIX}_loaded_models", "Models loaded in the engine", multiprocess_mode=LATEST)
EVICTION_REASONS = ("make_room", "memory_pressure")
EVICTIONS = Counter(
    f"{PREFIX}_evictions",
    "Idle models unloaded for memory: to make room for a load (make_room), or past the limits (memory_pressure)",
    ["reason"],
)
for _reason in EVICTION_REASONS:  # both series show from the start, at 0
    EVICTIONS.labels(reason=_reason)

# The engine: generation, per model.
GENERATION_SECONDS = Histogram(
    f"{PREFIX}_generation_seconds",
    "Seconds from the engine receiving a generation to its end, successful ones (the answer's generation_time_ms)",
    ["model"], buckets=GENERATION_BUCKETS_S,
)
TIME_TO_FIRST_TOKEN = Histogram(
    f"{PREFIX}_time_to_first_token_seconds", "Seconds from a sequence joining the queue to its first generated token",
    ["model"], buckets=FIRST_TOKEN_BUCKETS_S,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    f"{PREFIX}_time_per_output_token_seconds",
    "Mean seconds between a sequence's generated tokens after the first, one observation per sequence of 2+ tokens",
    ["model"], buckets=PER_TOKEN_BUCKETS_S,
)
QUEUE_WAIT = Histogram(
    f"{PREFIX}_queue_wait_seconds",
    "Seconds from a sequence joining the queue to the first batch step that computes it",
    ["model"], buckets=QUEUE_WAIT_BUCKETS_S,
)
QUEUE_DEPTH = Gauge(
    f"{PREFIX}_queue_depth", "Sequences waiting for a place in the model's batch", ["model"], multiprocess_mode=LATEST
)
BATCH_SIZE = Gauge(
    f"{PREFIX}_batch_size", "Sequences in the model's running batch", ["model"], multiprocess_mode=LATEST
)
STEP_SEQUENCES = Histogram(
    f"{PREFIX}_batch_step_sequences", "Sequences one batch step computes: decoding rows plus prompt chunks",
    ["model"], buckets=STEP_SEQUENCES_BUCKETS,
)
EXPECTED_FINISH = Histogram(
    f"{PREFIX}_expected_finish_seconds",
    "Seconds a request was expected to take when it arrived (queue ahead at the measured service rate)",
    ["model"], buckets=EXPECTED_FINISH_BUCKETS_S,
)
SHED = Counter(
    f"{PREFIX}_shed_requests",
    "Requests answered 429 on arrival because they were expected to finish past their deadline",
    ["model"],
)
PROMPT_TOKENS = Counter(
    f"{PREFIX}_prompt_tokens", "Prompt tokens of the sequences that reached a batch step, prefix-cache hits included",
    ["model"],
)
GENERATED_TOKENS = Counter(
    f"{PREFIX}_generated_tokens", "Generated tokens, those of cancelled and failed sequences included", ["model"]
)

# The engine's CPU threads, written every half second (engine/models/cpu_threads.py).
STEP_THREADS = Gauge(
    f"{PREFIX}_engine_step_threads",
    "Torch threads the engine's CPU steps run on: CPU_THREADS less the cores other processes keep busy",
    multiprocess_mode=LATEST,
)
# The engine: memory, written every round of the memory watchdog (5 s).
ENGINE_RSS = Gauge(f"{PREFIX}_engine_rss_bytes", "Resident memory of the engine process", multiprocess_mode=LATEST)
ENGINE_VMS = Gauge(f"{PREFIX}_engine_vms_bytes", "Virtual memory of the engine process", multiprocess_mode=LATEST)
GPU_ALLOCATED = Gauge(
    f"{PREFIX}_gpu_memory_allocated_bytes", "GPU memory held by the engine's tensors, per CUDA device", ["device"],
    multiprocess_mode=LATEST,
)
GPU_RESERVED = Gauge(
    f"{PREFIX}_gpu_memory_reserved_bytes", "GPU memory reserved by torch's caching allocator, per CUDA device",
    ["device"], multiprocess_mode=LATEST,
)

# The API workers.
ERRORS = Counter(
    f"{PREFIX}_errors", "Error answers by error_type, a stream's closing error event included", ["error_type"]
)
STREAM_DROP_REASONS = ("stalled",)
STREAMS_DROPPED = Counter(
    f"{PREFIX}_streams_dropped",
    "Streams dropped before their end by the server: stalled, the client took none of the bytes waiting for it "
    "for STREAM_STALL_TIMEOUT",
    ["reason"],
)
for _reason in STREAM_DROP_REASONS:  # shows from the start, at 0
    STREAMS_DROPPED.labels(reason=_reason)
CACHE_RESULTS = ("hit", "miss")
RESPONSE_CACHE = Counter(f"{PREFIX}_response_cache", "Response cache lookups by result: hit or miss", ["result"])
for _result in CACHE_RESULTS:  # both series show from the start, at 0
    RESPONSE_CACHE.labels(result=_result)

# The API workers: the providers of external models, by the external model's id (adapters/providers.py).
PROVIDER_OUTCOMES = ("ok", "rate_limited", "refused", "server_error", "unreachable", "timeout")
PROVIDER_REQUESTS = Counter(
    f"{PREFIX}_provider_requests",
    "Calls to a provider, each retry one more, by outcome: ok, rate_limited (429), refused (another 4xx), "
    "server_error (5xx), unreachable (no connection, or it broke), timeout",
    ["provider", "outcome"],
)
PROVIDER_ERRORS = Counter(
    f"{PREFIX}_provider_errors",
    "Errors answered for an external model by error_type: the provider's failures, and the calls refused here "
    "(provider_unavailable: circuit open; overloaded: its max_concurrency busy past queue_timeout_s)",
    ["provider", "error_type"],
)
PROVIDER_SECONDS = Histogram(
    f"{PREFIX}_provider_request_seconds", "Seconds of a call to a provider, to the end of its answer or its failure",
    ["provider"], buckets=GENERATION_BUCKETS_S,
)
TOKEN_KINDS = ("prompt", "completion")
PROVIDER_TOKENS = Counter(
    f"{PREFIX}_provider_tokens",
    "Tokens of a provider's answers as its usage reports them, by kind: prompt or completion",
    ["provider", "kind"],
)
PROVIDER_CIRCUIT = Gauge(
    f"{PREFIX}_provider_circuit_state",
    "A provider's circuit: 0 closed, 1 half-open, 2 open (calls refused); the most open of the API workers'",
    ["provider"], multiprocess_mode="max",
)
FALLBACKS = Counter(
    f"{PREFIX}_fallbacks",
    "Requests for a fallback chain passed on by a member (model) that could not serve them, by its error_type",
    ["chain", "model", "error_type"],
)


def bounded(value: str, allowed: Collection[str]) -> str:
    """The value if it is an allowed one, else `other`: a label never takes free text."""
    return value if value in allowed else OTHER


def count_fallback(chain_id: str, model_id: str, error_type: str) -> None:
    FALLBACKS.labels(chain=chain_id, model=model_id, error_type=error_type).inc()


def count_cache_lookup(hit: bool) -> None:
    RESPONSE_CACHE.labels(result="hit" if hit else "miss").inc()


def record_memory(rss_bytes: int, vms_bytes: int, gpu: dict[str, tuple[int, int]]) -> None:
    """The engine's RSS and VMS, and per CUDA device (`cuda:N`) its allocated and reserved bytes."""
    ENGINE_RSS.set(rss_bytes)
    ENGINE_VMS.set(vms_bytes)
    for device, (allocated, reserved) in gpu.items():
        GPU_ALLOCATED.labels(device=device).set(allocated)
        GPU_RESERVED.labels(device=device).set(reserved)


@dataclass(frozen=True)
class SchedulerMetrics:
    """One model's series, bound once when its scheduler is made, so that a batch step looks up no labels."""

    queue_wait: Histogram
    time_to_first_token: Histogram
    time_per_output_token: Histogram
    queue_depth: Gauge
    batch_size: Gauge
    step_sequences: Histogram
    prompt_tokens: Counter
    generated_tokens: Counter
    expected_finish: Histogram
    shed: Counter

    @classmethod
    def for_model(cls, model_id: str) -> SchedulerMetrics:
        return cls(
            queue_wait=QUEUE_WAIT.labels(model=model_id),
            time_to_first_token=TIME_TO_FIRST_TOKEN.labels(model=model_id),
            time_per_output_token=TIME_PER_OUTPUT_TOKEN.labels(model=model_id),
            queue_depth=QUEUE_DEPTH.labels(model=model_id),
            batch_size=BATCH_SIZE.labels(model=model_id),
            step_sequences=STEP_SEQUENCES.labels(model=model_id),
            prompt_tokens=PROMPT_TOKENS.labels(model=model_id),
            generated_tokens=GENERATED_TOKENS.labels(model=model_id),
            expected_finish=EXPECTED_FINISH.labels(model=model_id),
            shed=SHED.labels(model=model_id),
        )

    def occupancy(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.batch_size.set(running)


@dataclass(frozen=True)
class ProviderMetrics:
    """One provider's series, by the external model's id; each shows from the start, at 0."""

    provider: str

    def __post_init__(self) -> None:
        for outcome in PROVIDER_OUTCOMES:
            PROVIDER_REQUESTS.labels(provider=self.provider, outcome=outcome)
        for kind in TOKEN_KINDS:
            PROVIDER_TOKENS.labels(provider=self.provider, kind=kind)
        PROVIDER_SECONDS.labels(provider=self.provider)
        self.circuit(0)

    def call(self, outcome: str, seconds: float) -> None:
        PROVIDER_REQUESTS.labels(provider=self.provider, outcome=outcome).inc()
        PROVIDER_SECONDS.labels(provider=self.provider).observe(seconds)

    def error(self, error_type: str) -> None:
        PROVIDER_ERRORS.labels(provider=self.provider, error_type=error_type).inc()

    def tokens(self, prompt: int, completion: int) -> None:
        PROVIDER_TOKENS.labels(provider=self.provider, kind="prompt").inc(prompt)
        PROVIDER_TOKENS.labels(provider=self.provider, kind="completion").inc(completion)

    def circuit(self, level: int) -> None:
        PROVIDER_CIRCUIT.labels(provider=self.provider).set(level)
