"""Every Redis key vebaq writes itself, in one place (kombu's queue keys are kombu's own: a
pool's queue is the list named after the pool).

Keys are built by the functions and constants here and nowhere else, so that a reader can see at
a glance what vebaq keeps in Redis and who owns what.
"""

from __future__ import annotations

#: Prefix of every key vebaq writes.
PREFIX = "vebaq"

# --- producer: position in each vCenter's event stream, and who reads it

def checkpoint(instance_uuid: str) -> str:
    """JSON of the last event whose enqueue Redis confirmed (:mod:`producer.checkpoint`)."""
    return f"{PREFIX}:checkpoint:{instance_uuid}"


def published(instance_uuid: str) -> str:
    """Sorted set of recently published event keys, scored by creation time."""
    return f"{PREFIX}:published:{instance_uuid}"


def key_epoch(instance_uuid: str) -> str:
    """Counter bumped when a vCenter numbers its events anew."""
    return f"{PREFIX}:key-epoch:{instance_uuid}"


def lease(scope: str) -> str:
    """The producer lease for one vCenter (:mod:`producer.lease`), named by its normalised URL
    (:func:`vebaq.core.config.normalise_sdk_url`)."""
    return f"{PREFIX}:lease:{scope}"


#: Prefix of every lease key (``vebaq status`` lists them).
LEASE_PREFIX = f"{PREFIX}:lease:"

#: Sorted set of live producer id → its last heartbeat (Redis' clock, epoch seconds): how
#: producers count each other to share the vCenters out (:mod:`producer.membership`).
PRODUCERS = f"{PREFIX}:producers"


def producer_state(producer_id: str) -> str:
    """JSON of what one producer reads and how each of its vCenters is doing, rewritten with
    every heartbeat and expiring soon after the last (``vebaq status``)."""
    return f"{PREFIX}:producer:{producer_id}"


#: Hash of normalised vCenter URL → its instance UUID (which names its checkpoint), written at
#: each login, so that ``vebaq status`` finds the checkpoint of a vCenter nobody reads now.
VCENTER_INSTANCES = f"{PREFIX}:vcenter:instances"


# --- the event archive (:mod:`vebaq.core.archive`), per vCenter instance

def archive(instance_uuid: str) -> str:
    """Stream of the vCenter's archived events, entry ids from their creation times."""
    return f"{PREFIX}:archive:stream:{instance_uuid}"


def archive_meta(instance_uuid: str) -> str:
    """Hash: the archive's bytes, its last entry id and the vCenter's source URL."""
    return f"{PREFIX}:archive:meta:{instance_uuid}"


def archive_subjects(instance_uuid: str) -> str:
    """Hash of subject → number of archived events."""
    return f"{PREFIX}:archive:subjects:{instance_uuid}"


def archive_unsettled(instance_uuid: str) -> str:
    """Set of ids of events archived but not yet checkpointed (at most a batch or two)."""
    return f"{PREFIX}:archive:unsettled:{instance_uuid}"


#: Hash of vCenter instance UUID → its source URL, for every vCenter with an archive.
ARCHIVE_SOURCES = f"{PREFIX}:archive:sources"

def ingress_event_source(event_id: str) -> str:
    """The ``source`` of the event ``vebaq ingress`` accepted with this id
    (:mod:`producer.ingress`): a different source reusing the id is refused."""
    return f"{PREFIX}:ingress:source:{event_id}"


# --- throttled triggers (:mod:`vebaq.core.throttle`): shared by every producer on this Redis

def throttle_state(trigger: str, mode: str, key: str) -> str:
    """Time (ms) of the event that passed (``once_within``) or of the last one (``once_after``)
    for one trigger and key."""
    return f"{PREFIX}:throttle:{mode}:{trigger}:{key}"


def throttle_batch(member: str) -> str:
    """List of the events held for one batch; ``member`` is JSON ``[trigger, pool, key]``."""
    return f"{PREFIX}:throttle:batch:{member}"


#: Sorted set of batch members (JSON ``[trigger, pool, key]``) → when the batch falls due (ms).
THROTTLE_DUE = f"{PREFIX}:throttle:due"
#: Hash of ``<member>\n<first event id>`` → JSON list of a full or due batch's events, until the
#: producer sent it.
THROTTLE_FIRING = f"{PREFIX}:throttle:firing"


def throttle_memo(instance_uuid: str) -> str:
    """Hash of ``<trigger>\n<event id>`` → the decision for events not yet checkpointed."""
    return f"{PREFIX}:throttle:memo:{instance_uuid}"


# --- workers: what already ran, and the vrops pool's per-host state

def done(pool: str, function: str, event_id: str) -> str:
    """Done marker of one function for one event (:mod:`vebaq.core.done`)."""
    return f"{PREFIX}:done:{pool}:{function}:{event_id}"


def delivery(task_id: str) -> str:
    """Hash: deliveries of one task message, the function running, interrupted runs per
    function and the last exit status (the poison breaker, :mod:`workers.breaker`)."""
    return f"{PREFIX}:delivery:{task_id}"


def vrops_applied(vc_uuid: str, moref: str) -> str:
    """Hash with the latest maintenance event applied to one host in vROps."""
    return f"{PREFIX}:vrops:applied:{vc_uuid}:{moref}"


def vrops_lock(vc_uuid: str, moref: str) -> str:
    """Per-host lock of the vrops pool."""
    return f"{PREFIX}:vrops:lock:{vc_uuid}:{moref}"


# --- retries waiting for their back-off (:mod:`vebaq.core.retrystore`)

#: Sorted set of retry id → epoch seconds when it is due.
RETRIES_DUE = f"{PREFIX}:retries:due"
#: Sorted set of retry id → lease deadline: claimed by a worker that is sending it.
RETRIES_CLAIMED = f"{PREFIX}:retries:claimed"
#: Hash of retry id → JSON record.
RETRIES_RECORDS = f"{PREFIX}:retries:records"

# --- dead letters (:mod:`vebaq.core.deadletters`)

#: Hash of dead-letter id → JSON record.
DEAD_LETTER_RECORDS = f"{PREFIX}:dlq:records"
#: Sorted set of dead-letter ids scored by the time they were dead-lettered.
DEAD_LETTER_INDEX = f"{PREFIX}:dlq:index"
#: Hash of JSON ``[subject, pool]`` → number of dead letters.
DEAD_LETTER_COUNTS = f"{PREFIX}:dlq:counts"


def dead_letter_replay_lock(letter_id: str) -> str:
    """Held while one dead letter is being replayed, so two replays of it send one task."""
    return f"{PREFIX}:dlq:replaying:{letter_id}"


# --- replication (:mod:`vebaq.core.replication`)

#: A key written just before ``WAIT``, so that the wait covers every earlier write of the master.
REPLICATION_PROBE = f"{PREFIX}:replication:probe"
