"""A typed, defaulted and validated view of a TaskQueue's ``spec``.

The CRD's structural schema and CEL rules reject most bad input at admission time, and the API
server fills in the schema defaults. This module still applies every default itself and re-checks
what it relies on, for three reasons: objects stored before a CRD upgrade do not carry new defaults
(defaults on read are not written back), unit tests and the operator's own callers build specs
without an API server, and a few checks cannot be written in CEL (cron field ranges, say). Every
error names the field, in the same ``spec.a.b`` form ``kubectl explain`` uses.

``DEFAULTS`` is the single Python statement of the defaults; ``tests/operator/test_spec.py`` checks
that the CRD's ``default:`` values say the same.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from sluiceway import contract


class SpecError(ValueError):
    """The spec is invalid. ``field`` is the offending path, e.g. ``spec.scaling.maxReplicas``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class BrokerType(StrEnum):
    REDIS = "redis"
    RABBITMQ = "rabbitmq"
    KAFKA = "kafka"


class DeletionPolicy(StrEnum):
    """What deleting the TaskQueue does to its queue (the finalizer decides in ``deletion.py``)."""

    RETAIN = "Retain"  # stop the workers, keep the queue, DLQ and schedule state for a re-created TaskQueue
    PURGE = "Purge"  # also delete every Redis key of the queue


class ConcurrencyMode(StrEnum):
    THREAD = "thread"
    ASYNCIO = "asyncio"
    PROCESS = "process"  # perPod child processes, each running the function outside the others' GIL


# Nested like the spec itself; only leaves that have a default appear. Absent optional fields
# (rateLimit, replicas, maxMessageAgeSeconds, ...) have no default on purpose: absence means
# "unlimited", "autoscale" or "no limit".
DEFAULTS: Final[Mapping[str, Any]] = {
    "imagePullPolicy": "IfNotPresent",
    "deletionPolicy": "Retain",
    "broker": {"kafka": {"partitions": 6, "ordering": "none"}},
    "rateLimit": {"burst": 0},
    # prefetch -1 = automatic: about 100 ms of work at the measured rate (the worker computes it;
    # none under a rate limit). 0 would switch off prefetch and the send-ahead round trip.
    "concurrency": {"mode": "thread", "perPod": 8, "prefetch": -1},
    "retry": {"maxAttempts": 5, "backoffSeconds": 1, "maxBackoffSeconds": 300},
    "timeoutSeconds": 300,
    "results": {"ttlSeconds": contract.DEFAULT_RESULT_TTL_SECONDS},
    "liveness": {
        "heartbeatSeconds": 2,
        "leaseSeconds": 15,
        "missedHeartbeats": 3,
        "replaceAfterSeconds": 120,
    },
    "scaling": {
        "minReplicas": 0,
        "maxReplicas": 10,
        "targetDrainSeconds": 30,
        "scaleDownStabilizationSeconds": 60,
        "cooldownSeconds": 120,
        "pollIntervalSeconds": 2,
        "qpsHeadroom": 0.1,
        "assumedTaskSeconds": 1,
    },
    "paused": False,
    "schedules[]": {"timeZone": "UTC", "suspend": False},
}

# One definition each, in the contract: the CRD's CEL rules and the worker use the same.
FUNCTION_RE: Final = contract.FUNCTION_RE
QUEUE_RE: Final = contract.QUEUE_RE
DNS_LABEL_RE: Final = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
ENV_NAME_RE: Final = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
RESERVED_ENV_PREFIX: Final = "SLUICEWAY_"
RESERVED_LABELS: Final = frozenset(
    {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by"}
)
RESERVED_PREFIX: Final = "sluiceway.dev/"
POD_DELETION_COST: Final = "controller.kubernetes.io/pod-deletion-cost"
MAX_NAME_LENGTH: Final = 63  # the TaskQueue name becomes a label value
MAX_INTERVAL_SECONDS: Final = 31_536_000  # a year


@dataclass(frozen=True, slots=True)
class SecretKeyRef:
    name: str
    key: str


KAFKA_DEFAULT_PARTITIONS: Final = DEFAULTS["broker"]["kafka"]["partitions"]


@dataclass(frozen=True, slots=True)
class KafkaTopic:
    partitions: int = KAFKA_DEFAULT_PARTITIONS  # of the work topic, when the operator creates it
    ordering: str = "none"  # none | key


@dataclass(frozen=True, slots=True)
class Broker:
    type: BrokerType
    queue: str  # always resolved: spec.broker.queue, or the TaskQueue's name
    url_secret_ref: SecretKeyRef | None  # None for redis = use the coordination Redis
    kafka: KafkaTopic | None = None  # set (with defaults) exactly when type is kafka


@dataclass(frozen=True, slots=True)
class RateLimit:
    qps: float | None  # None = unlimited
    burst: int


@dataclass(frozen=True, slots=True)
class Concurrency:
    mode: ConcurrencyMode
    per_pod: int
    prefetch: int  # -1 = automatic (the worker's default)


@dataclass(frozen=True, slots=True)
class Retry:
    max_attempts: int
    backoff_seconds: float
    max_backoff_seconds: float


@dataclass(frozen=True, slots=True)
class Liveness:
    heartbeat_seconds: float
    lease_seconds: float
    missed_heartbeats: int  # stale after this many intervals without a heartbeat
    replace_after_seconds: int  # 0 = never replace a silent pod


@dataclass(frozen=True, slots=True)
class Scaling:
    min_replicas: int
    max_replicas: int
    target_drain_seconds: float
    scale_down_stabilization_seconds: float
    cooldown_seconds: float
    poll_interval_seconds: float
    qps_headroom: float
    assumed_task_seconds: float


@dataclass(frozen=True, slots=True)
class Interval:
    seconds: int
    start: dt.datetime | None  # None = the TaskQueue's creation, so the phase survives restarts


@dataclass(frozen=True, slots=True)
class Schedule:
    """One ``spec.schedules[]`` entry: exactly one of ``cron``, ``interval`` and ``at`` is set.

    ``problem`` says why the entry cannot fire (it names the field); such an entry marks only
    itself, never the TaskQueue or its other schedules. The cron expression and the zone are
    checked where they are used, by ``cron.parse`` (their one owner).
    """

    name: str
    cron: str | None
    interval: Interval | None
    at: dt.datetime | None
    time_zone: str
    message: Mapping[str, Any]
    suspend: bool
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class PodSecurity:
    """Only the settings that cannot weaken the restricted profile."""

    run_as_user: int | None
    run_as_group: int | None
    fs_group: int | None
    supplemental_groups: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PodTemplate:
    resources: Mapping[str, Any]
    env: tuple[Mapping[str, Any], ...]
    env_from: tuple[Mapping[str, Any], ...]
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]
    affinity: Mapping[str, Any]
    topology_spread_constraints: tuple[Mapping[str, Any], ...]
    service_account_name: str | None
    automount_service_account_token: bool
    priority_class_name: str | None
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    image_pull_secrets: tuple[str, ...]
    security_context: PodSecurity


@dataclass(frozen=True, slots=True)
class TaskQueueSpec:
    image: str
    image_pull_policy: str
    function: str
    broker: Broker
    coordination_secret_ref: SecretKeyRef | None  # None = the operator's configured Redis
    rate_limit: RateLimit
    concurrency: Concurrency
    retry: Retry
    timeout_seconds: int
    result_ttl_seconds: int  # how long a call's result waits in Redis (docs/results.md)
    max_message_age_seconds: int | None
    liveness: Liveness
    scaling: Scaling
    replicas: int | None  # the /scale pin; None = autoscale
    paused: bool  # no consumption and no schedules; nothing is deleted
    schedules: tuple[Schedule, ...]
    pod_template: PodTemplate
    deletion_policy: DeletionPolicy = DeletionPolicy.RETAIN


def parse_spec(raw: Mapping[str, Any], *, name: str) -> TaskQueueSpec:
    """Parse ``raw`` (the TaskQueue's ``spec``) for the TaskQueue called ``name``.

    Raises ``SpecError`` naming the first invalid field.
    """
    if not DNS_LABEL_RE.match(name):
        raise SpecError(
            "metadata.name", f"{name!r} must be a DNS label of at most {MAX_NAME_LENGTH} characters"
        )
    r = _Reader(raw, "spec")
    image = r.required_string("image", max_length=1024)
    function = r.required_string("function", max_length=512)
    if not FUNCTION_RE.match(function):
        raise SpecError("spec.function", f"{function!r} {contract.FUNCTION_PROBLEM}")
    pull = r.choice("imagePullPolicy", ("Always", "IfNotPresent", "Never"), DEFAULTS["imagePullPolicy"])

    spec = TaskQueueSpec(
        image=image,
        image_pull_policy=pull,
        function=function,
        broker=_broker(r.child("broker", required=True), name),
        coordination_secret_ref=_secret_ref(r.child("coordination").child("urlSecretRef")),
        rate_limit=_rate_limit(r.child("rateLimit")),
        concurrency=_concurrency(r.child("concurrency")),
        retry=_retry(r.child("retry")),
        timeout_seconds=r.integer("timeoutSeconds", DEFAULTS["timeoutSeconds"], low=1, high=86400),
        result_ttl_seconds=r.child("results").integer(
            "ttlSeconds", DEFAULTS["results"]["ttlSeconds"], low=1, high=7 * 86400
        ),
        max_message_age_seconds=r.optional_integer("maxMessageAgeSeconds", low=1, high=31_536_000),
        liveness=_liveness(r.child("liveness")),
        scaling=_scaling(r.child("scaling")),
        replicas=r.optional_integer("replicas", low=0, high=10000),
        paused=r.boolean("paused", DEFAULTS["paused"]),
        schedules=_schedules(r),
        pod_template=_pod_template(r.child("podTemplate")),
        deletion_policy=DeletionPolicy(
            r.choice("deletionPolicy", tuple(DeletionPolicy), DEFAULTS["deletionPolicy"])
        ),
    )
    return spec


def keys_for(namespace: str, spec: TaskQueueSpec) -> contract.Keys:
    """The Redis key scope of a TaskQueue: its namespace and resolved queue name."""
    return contract.Keys(namespace=namespace, queue=spec.broker.queue)


# --- Sections -------------------------------------------------------------------------------------


def _broker(r: _Reader, name: str) -> Broker:
    kind = BrokerType(r.choice("type", tuple(BrokerType), None))
    queue = r.string("queue", max_length=200) or name
    if not QUEUE_RE.match(queue):
        raise SpecError(r.path("queue"), f"{queue!r} {contract.QUEUE_PROBLEM}")
    if kind is BrokerType.RABBITMQ and queue.startswith("amq."):
        raise SpecError(r.path("queue"), "RabbitMQ reserves queue names that start with 'amq.'")
    ref = _secret_ref(r.child("urlSecretRef"))
    if ref is None and kind is not BrokerType.REDIS:
        raise SpecError(r.path("urlSecretRef"), f"a {kind} broker needs the Secret that holds its URL")
    k = r.child("kafka")
    if k.present and kind is not BrokerType.KAFKA:
        raise SpecError(r.path("kafka"), f"applies only to broker type kafka, not {kind}")
    kafka = None
    if kind is BrokerType.KAFKA:
        kafka = KafkaTopic(
            partitions=k.integer("partitions", KAFKA_DEFAULT_PARTITIONS, low=1, high=10000),
            ordering=k.choice("ordering", ("none", "key"), DEFAULTS["broker"]["kafka"]["ordering"]),
        )
    return Broker(type=kind, queue=queue, url_secret_ref=ref, kafka=kafka)


def _secret_ref(r: _Reader) -> SecretKeyRef | None:
    if not r.present:
        return None
    return SecretKeyRef(
        name=r.required_string("name", max_length=253), key=r.required_string("key", max_length=253)
    )


def _rate_limit(r: _Reader) -> RateLimit:
    d = DEFAULTS["rateLimit"]
    if not r.present:
        return RateLimit(qps=None, burst=d["burst"])
    qps = r.number("qps", None, low=0, high=1_000_000, low_exclusive=True)
    return RateLimit(qps=qps, burst=r.integer("burst", d["burst"], low=0, high=1_000_000))


def _concurrency(r: _Reader) -> Concurrency:
    d = DEFAULTS["concurrency"]
    return Concurrency(
        mode=ConcurrencyMode(r.choice("mode", tuple(ConcurrencyMode), d["mode"])),
        per_pod=r.integer("perPod", d["perPod"], low=1, high=10000),
        prefetch=r.integer("prefetch", d["prefetch"], low=-1, high=10000),
    )


def _retry(r: _Reader) -> Retry:
    d = DEFAULTS["retry"]
    backoff = r.number("backoffSeconds", d["backoffSeconds"], low=0, high=86400)
    max_backoff = r.number("maxBackoffSeconds", d["maxBackoffSeconds"], low=0, high=86400)
    if max_backoff < backoff:
        raise SpecError(r.path("maxBackoffSeconds"), "must be at least backoffSeconds")
    return Retry(
        max_attempts=r.integer("maxAttempts", d["maxAttempts"], low=1, high=1000),
        backoff_seconds=backoff,
        max_backoff_seconds=max_backoff,
    )


def _liveness(r: _Reader) -> Liveness:
    d = DEFAULTS["liveness"]
    heartbeat = r.number("heartbeatSeconds", d["heartbeatSeconds"], low=0.1, high=300)
    lease = r.number("leaseSeconds", d["leaseSeconds"], low=1, high=3600)
    if contract.lease_too_short(lease, heartbeat):
        raise SpecError(
            r.path("leaseSeconds"), f"must be at least {contract.MIN_LEASE_HEARTBEATS} x heartbeatSeconds"
        )
    return Liveness(
        heartbeat_seconds=heartbeat,
        lease_seconds=lease,
        missed_heartbeats=r.integer("missedHeartbeats", d["missedHeartbeats"], low=1, high=100),
        replace_after_seconds=r.integer("replaceAfterSeconds", d["replaceAfterSeconds"], low=0, high=86400),
    )


def _scaling(r: _Reader) -> Scaling:
    d = DEFAULTS["scaling"]
    low = r.integer("minReplicas", d["minReplicas"], low=0, high=10000)
    high = r.integer("maxReplicas", d["maxReplicas"], low=1, high=10000)
    if low > high:
        raise SpecError(r.path("minReplicas"), f"must not exceed maxReplicas ({low} > {high})")
    return Scaling(
        min_replicas=low,
        max_replicas=high,
        target_drain_seconds=r.number("targetDrainSeconds", d["targetDrainSeconds"], low=1, high=86400),
        scale_down_stabilization_seconds=r.number(
            "scaleDownStabilizationSeconds", d["scaleDownStabilizationSeconds"], low=0, high=3600
        ),
        cooldown_seconds=r.number("cooldownSeconds", d["cooldownSeconds"], low=0, high=86400),
        poll_interval_seconds=r.number("pollIntervalSeconds", d["pollIntervalSeconds"], low=0.5, high=300),
        qps_headroom=r.number("qpsHeadroom", d["qpsHeadroom"], low=0, high=10),
        assumed_task_seconds=r.number("assumedTaskSeconds", d["assumedTaskSeconds"], low=0.001, high=86400),
    )


def _schedules(r: _Reader) -> tuple[Schedule, ...]:
    out: list[Schedule] = []
    seen: set[str] = set()
    for i, item in enumerate(r.items("schedules", max_items=100)):
        sname = item.required_string("name", max_length=63)
        if not DNS_LABEL_RE.match(sname):
            raise SpecError(item.path("name"), f"{sname!r} must be a DNS label (lowercase, digits, '-')")
        if sname in seen:
            raise SpecError(f"spec.schedules[{i}].name", f"duplicate schedule name {sname!r}")
        seen.add(sname)
        try:
            out.append(_schedule(item, sname))
        except SpecError as exc:
            # Admission rejects these; an object stored before a CRD upgrade can still hold one.
            out.append(_broken_schedule(item, sname, str(exc)))
    return tuple(out)


def _schedule(item: _Reader, sname: str) -> Schedule:
    d = DEFAULTS["schedules[]"]
    cron = item.string("cron", max_length=128)
    interval = _interval(item.child("interval"))
    at = _date_time(item, "at")
    given = [key for key, value in (("cron", cron), ("interval", interval), ("at", at)) if value is not None]
    if len(given) != 1:
        raise SpecError(item.where, f"set exactly one of cron, interval and at, not {given or 'none'}")
    return Schedule(
        name=sname,
        cron=cron,
        interval=interval,
        at=at,
        time_zone=item.string("timeZone", max_length=64) or d["timeZone"],
        message=item.mapping("message"),
        suspend=item.boolean("suspend", d["suspend"]),
    )


def _broken_schedule(item: _Reader, sname: str, problem: str) -> Schedule:
    d = DEFAULTS["schedules[]"]
    return Schedule(
        name=sname,
        cron=None,
        interval=None,
        at=None,
        time_zone=d["timeZone"],
        message={},
        suspend=False,
        problem=problem,
    )


def _interval(r: _Reader) -> Interval | None:
    if not r.present:
        return None
    seconds = r.optional_integer("seconds", low=1, high=MAX_INTERVAL_SECONDS)
    if seconds is None:
        raise SpecError(r.path("seconds"), "is required")
    return Interval(seconds=seconds, start=_date_time(r, "start"))


def _date_time(r: _Reader, key: str) -> dt.datetime | None:
    text = r.string(key, max_length=64)
    if text is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise SpecError(r.path(key), f"{text!r} must be an RFC 3339 date-time with an offset")
    return moment.astimezone(dt.UTC)


def _pod_template(r: _Reader) -> PodTemplate:
    labels = r.string_map("labels")
    for key in labels:
        if key in RESERVED_LABELS or key.startswith(RESERVED_PREFIX):
            raise SpecError(r.path("labels"), f"label {key!r} is reserved for the operator")
    annotations = r.string_map("annotations")
    for key in annotations:
        if key == POD_DELETION_COST or key.startswith(RESERVED_PREFIX):
            raise SpecError(r.path("annotations"), f"annotation {key!r} is reserved for the operator")
    env = tuple(r.mapping_list("env"))
    names: set[str] = set()
    for i, var in enumerate(env):
        var_name = var.get("name")
        where = f"{r.path('env')}[{i}].name"
        if not isinstance(var_name, str) or not ENV_NAME_RE.match(var_name):
            raise SpecError(where, f"{var_name!r} is not a valid environment variable name")
        if var_name.startswith(RESERVED_ENV_PREFIX):
            raise SpecError(where, f"{var_name} is set by the operator from the TaskQueue spec")
        if var_name in names:
            raise SpecError(where, f"duplicate variable {var_name}")
        names.add(var_name)
    sc = r.child("securityContext")
    pulls: list[str] = []
    for item in r.items("imagePullSecrets", max_items=20):
        secret = item.required_string("name", max_length=253)
        pulls.append(secret)
    return PodTemplate(
        resources=r.mapping("resources"),
        env=env,
        env_from=tuple(r.mapping_list("envFrom")),
        node_selector=r.string_map("nodeSelector"),
        tolerations=tuple(r.mapping_list("tolerations")),
        affinity=r.mapping("affinity"),
        topology_spread_constraints=tuple(r.mapping_list("topologySpreadConstraints")),
        service_account_name=r.string("serviceAccountName", max_length=253) or None,
        automount_service_account_token=r.boolean("automountServiceAccountToken", False),
        priority_class_name=r.string("priorityClassName", max_length=253) or None,
        labels=labels,
        annotations=annotations,
        image_pull_secrets=tuple(pulls),
        security_context=PodSecurity(
            run_as_user=sc.optional_integer("runAsUser", low=1, high=2**31 - 1),
            run_as_group=sc.optional_integer("runAsGroup", low=0, high=2**31 - 1),
            fs_group=sc.optional_integer("fsGroup", low=0, high=2**31 - 1),
            supplemental_groups=tuple(sc.int_list("supplementalGroups", low=0, high=2**31 - 1)),
        ),
    )


# --- A reader that names the field in every error -------------------------------------------------


class _Reader:
    """Typed access to one mapping of the spec, knowing its own path for error messages."""

    def __init__(self, data: Any, where: str) -> None:
        if data is not None and not isinstance(data, Mapping):
            raise SpecError(where, f"must be an object, not {type(data).__name__}")
        self.data: Mapping[str, Any] = data or {}
        self.where = where
        self.present = data is not None

    def path(self, key: str) -> str:
        return f"{self.where}.{key}"

    def child(self, key: str, *, required: bool = False) -> _Reader:
        value = self.data.get(key)
        if value is None and required:
            raise SpecError(self.path(key), "is required")
        return _Reader(value, self.path(key))

    def _get(self, key: str, required: bool) -> Any:
        value = self.data.get(key)
        if value is None and required:
            raise SpecError(self.path(key), "is required")
        return value

    def string(self, key: str, *, max_length: int) -> str | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise SpecError(self.path(key), f"must be a string, not {type(value).__name__}")
        if len(value) > max_length:
            raise SpecError(self.path(key), f"must be at most {max_length} characters")
        return value

    def required_string(self, key: str, *, max_length: int) -> str:
        value = self.string(key, max_length=max_length)
        if not value:
            raise SpecError(self.path(key), "is required" if value is None else "must not be empty")
        return value

    def choice(self, key: str, allowed: Sequence[str], default: str | None) -> str:
        value = self._get(key, default is None)
        if value is None:
            assert default is not None
            return default
        if value not in allowed:
            raise SpecError(self.path(key), f"{value!r} must be one of {', '.join(map(str, allowed))}")
        return str(value)

    def optional_integer(self, key: str, *, low: int, high: int) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        # bool is an int in Python but never a valid count in the API.
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise SpecError(self.path(key), f"must be an integer, not {value!r}")
        if not low <= value <= high:
            raise SpecError(self.path(key), f"must be between {low} and {high}, not {value}")
        return value

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        value = self.optional_integer(key, low=low, high=high)
        return default if value is None else value

    def number(
        self,
        key: str,
        default: float | None,
        *,
        low: float,
        high: float,
        low_exclusive: bool = False,
    ) -> float:
        value = self._get(key, default is None)
        if value is None:
            assert default is not None
            return float(default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SpecError(self.path(key), f"must be a number, not {value!r}")
        too_low = value <= low if low_exclusive else value < low
        if too_low or value > high:
            bound = f"greater than {low}" if low_exclusive else f"at least {low}"
            raise SpecError(self.path(key), f"must be {bound} and at most {high}, not {value}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise SpecError(self.path(key), f"must be true or false, not {value!r}")
        return value

    def mapping(self, key: str) -> Mapping[str, Any]:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise SpecError(self.path(key), f"must be an object, not {type(value).__name__}")
        return dict(value)

    def string_map(self, key: str) -> Mapping[str, str]:
        value = self.mapping(key)
        for k, v in value.items():
            if not isinstance(v, str):
                raise SpecError(f"{self.path(key)}.{k}", f"must be a string, not {v!r}")
        return value

    def _list(self, key: str, max_items: int) -> list[Any]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            raise SpecError(self.path(key), f"must be a list, not {type(value).__name__}")
        if len(value) > max_items:
            raise SpecError(self.path(key), f"must have at most {max_items} items")
        return list(value)

    def items(self, key: str, *, max_items: int) -> list[_Reader]:
        return [_Reader(v, f"{self.path(key)}[{i}]") for i, v in enumerate(self._list(key, max_items))]

    def mapping_list(self, key: str, max_items: int = 100) -> list[Mapping[str, Any]]:
        return [dict(r.data) for r in self.items(key, max_items=max_items)]

    def int_list(self, key: str, *, low: int, high: int) -> list[int]:
        out: list[int] = []
        for i, v in enumerate(self._list(key, 32)):
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise SpecError(f"{self.path(key)}[{i}]", f"must be an integer between {low} and {high}")
            out.append(v)
        return out
