#!/usr/bin/env python3
"""A Concord adapter in Python: one system joining through the wire contract alone.

The system is a JSON file (`--store`) holding its records and, beside each field value, the
stamp of the write that produced it. The adapter

* consumes its inbox `{ns}.inbox.<system>` (never declaring it: the router does), applies only
  what the router's broker user published, merges each field by its stamp so a stale copy never
  overwrites a newer value, saves, then acknowledges; anything it cannot apply is dead-lettered
  to `{ns}.dlx` with a `concord-reason` header;
* publishes local edits (JSON lines on stdin, as a user of the system would make them) to
  `{ns}.ingress` with routing key `<system>.<entity>`, persistent, with publisher confirms,
  `user_id` = its broker user, `message_id` = the event id and header
  `concord-key = <entity>/<key>`; an edit waits in an outbox in the store until confirmed.

It reports what it does as JSON lines on stdout (`ready`, `applied`, `duplicate`,
`dead_lettered`, `published`, `overruled`, `error`); logs go to stderr.

The merge rules (`receive`, `local_edit`) are pure functions over the store's data; the AMQP
session and the file are the shell around them. See README.md.
"""

import argparse
import base64
import importlib
import json
import logging
import os
import pathlib
import queue
import sys
import threading
import time
import uuid

import pika
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError

LOGICAL_BITS = 16
# The router refuses clocks further ahead than this; the adapter ignores clocks beyond twice it.
CLOCK_SKEW_MS = 60_000
# Event ids remembered for deduplication (redeliveries arrive soon after the first copy).
SEEN_LIMIT = 10_000
MAX_DETAIL = 1024

log = logging.getLogger("concord-python-adapter")


class Permanent(Exception):
    """A message that can never be applied: dead-lettered with `reason`."""

    def __init__(self, reason, detail):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def now_ms():
    return time.time_ns() // 1_000_000


def uuid7():
    """A UUID v7 (48 bits of Unix milliseconds, then random bits)."""
    rand = int.from_bytes(os.urandom(10), "big")
    value = (now_ms() & (2**48 - 1)) << 80 | 0x7 << 76 | (rand >> 62 & 0xFFF) << 64
    value |= 0b10 << 62 | rand & (2**62 - 1)
    return str(uuid.UUID(int=value))


# ---------------------------------------------------------------------------------------------
# Pure core: the store is plain data
#   {"hlc": int, "seen": [event ids], "ranks": {entity: {field: rank}}, "outbox": [...],
#    "records": {entity: {key: {"exists": bool, "tombstone": [hlc, system] | null,
#                                "fields": {field: {"value": json | null,
#                                                   "stamp": [rank, hlc, system]}}}}}}
# ---------------------------------------------------------------------------------------------


def empty_store():
    return {"hlc": 0, "seen": [], "ranks": {}, "outbox": [], "records": {}}


def effective(stamp, me, own_rank):
    """The stamp a held value is compared by: the system's own writes carry its current rank."""
    rank, hlc, system = stamp
    return (own_rank if system == me else rank, hlc, system)


def observe(store, hlc, now):
    """Moves the clock past a remote one, unless that one is implausibly far ahead."""
    if hlc >> LOGICAL_BITS <= now + 2 * CLOCK_SKEW_MS:
        store["hlc"] = max(store["hlc"], hlc)


def tick(store, now):
    """A clock value for a local write: after everything issued or observed."""
    if store["hlc"] >> LOGICAL_BITS > now + 2 * CLOCK_SKEW_MS:
        store["hlc"] = 0  # found far ahead (a bad clock earlier): reset
    store["hlc"] = max(store["hlc"] + 1, now << LOGICAL_BITS)
    return store["hlc"]


def receive(store, me, ev, values, now):
    """Merges a routed copy (`ev`, its masked fields decoded into `values`) into the store.

    Returns (changed, stale): the fields that took the copy's value and those that kept a newer
    one. Field writes merge by stamp (rank, hlc, system), the greatest winning; a delete clears
    what was written before it (by clock) and the record goes if nothing was written after it.
    """
    records = store["records"].setdefault(ev.entity, {})
    record = records.setdefault(ev.key, {"exists": False, "tombstone": None, "fields": {}})
    ranks = store["ranks"].setdefault(ev.entity, {})
    changed, stale = [], []
    if ev.op == OP_DELETE:
        delete = (ev.record_clock.hlc, ev.record_clock.system)
        observe(store, delete[0], now)
        tomb = record["tombstone"]
        if tomb is not None and delete <= tuple(tomb):
            return changed, ["*"]
        record["tombstone"] = list(delete)
        for name in sorted(record["fields"]):
            stamp = record["fields"][name]["stamp"]
            if (stamp[1], stamp[2]) <= delete:
                del record["fields"][name]
                changed.append(name)
        record["exists"] = record["exists"] and bool(record["fields"])
        return changed, stale
    tomb = record["tombstone"]
    for name in ev.field_mask:
        if name not in values:
            continue  # a field this schema does not know
        clock = ev.clocks[name]
        observe(store, clock.hlc, now)
        own_rank = ranks[name] = ev.receiver_ranks.get(name, 0)
        if tomb is not None and (clock.hlc, clock.system) <= tuple(tomb):
            stale.append(name)  # written before the record's delete
            continue
        incoming = (clock.rank, clock.hlc, clock.system)
        held = record["fields"].get(name)
        if held is not None and incoming <= effective(held["stamp"], me, own_rank):
            stale.append(name)
            continue
        record["fields"][name] = {"value": values[name], "stamp": list(incoming)}
        changed.append(name)
    # Only a creator's copy makes the record appear; other values are kept until one does.
    if ev.may_create:
        record["exists"] = True
    return changed, stale


def local_edit(store, me, entity, key, values, now):
    """A user of the system edits fields of an existing record.

    Returns (publish, hlc, overruled): the fields to publish with their clock, and those whose
    edit is refused because a higher-ranked owner's value stands (the edit of a field the system
    does not own: the owner's value stays, i.e. is written back).
    """
    record = store["records"].get(entity, {}).get(key)
    if record is None or not record["exists"]:
        raise ValueError(f"no record {entity}/{key}")
    ranks = store["ranks"].get(entity, {})
    publish, overruled = {}, []
    for name, value in values.items():
        held = record["fields"].get(name)
        own_rank = ranks.get(name, 0)
        if held is None and value is None or held is not None and held["value"] == value:
            continue  # unchanged
        if held is not None and held["stamp"][2] != me and held["stamp"][0] > own_rank:
            overruled.append(name)
            continue
        publish[name] = value
    hlc = None
    if publish:
        hlc = tick(store, now)
        for name, value in publish.items():
            record["fields"][name] = {"value": value, "stamp": [ranks.get(name, 0), hlc, me]}
    return publish, hlc, overruled


def remember(store, event_id):
    store["seen"].append(event_id)
    del store["seen"][:-SEEN_LIMIT]


# ---------------------------------------------------------------------------------------------
# Protobuf: the envelope and the entity messages, from the classes generated by protoc
# ---------------------------------------------------------------------------------------------


def load_generated(gen_dir):
    """Imports every `*_pb2.py` under `gen_dir` (registering its messages in the default pool)."""
    global envelope, OP_DELETE, OP_UPSERT
    sys.path.insert(0, str(gen_dir))
    for path in sorted(pathlib.Path(gen_dir).rglob("*_pb2.py")):
        module = ".".join(path.relative_to(gen_dir).with_suffix("").parts)
        importlib.import_module(module)
    envelope = importlib.import_module("concord.v1.envelope_pb2")
    OP_DELETE, OP_UPSERT = envelope.OP_DELETE, envelope.OP_UPSERT


def message_class(full_name):
    return message_factory.GetMessageClass(
        descriptor_pool.Default().FindMessageTypeByName(full_name)
    )


def decode_fields(cls, record, mask):
    """The masked fields of an encoded entity message, in the protobuf JSON mapping (None: the
    field is cleared). Fields this schema does not know are left out."""
    try:
        message = cls.FromString(record)
    except DecodeError as e:
        raise Permanent("invalid_record", f"record: {e}")
    as_json = json_format.MessageToDict(message, preserving_proto_field_name=True)
    known = cls.DESCRIPTOR.fields_by_name
    return {name: as_json.get(name) for name in mask if name in known}


def normalize(cls, values):
    """Local values in the canonical JSON form (e.g. int64 as a string), checked by the schema."""
    set_values = {k: v for k, v in values.items() if v is not None}
    message = json_format.ParseDict(set_values, cls())
    as_json = json_format.MessageToDict(message, preserving_proto_field_name=True)
    unknown = set(values) - set(cls.DESCRIPTOR.fields_by_name)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    return {name: as_json.get(name) for name in values}


# ---------------------------------------------------------------------------------------------
# Shell: the store file, stdout reports, the AMQP session
# ---------------------------------------------------------------------------------------------


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


class StoreFile:
    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.reload()

    def reload(self):
        """Back to what the file holds (after a failed save: nothing of it was applied)."""
        self.data = json.loads(self.path.read_text()) if self.path.exists() else empty_store()

    def save(self):
        """Atomically: the new file replaces the old one whole, or not at all."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class Adapter:
    def __init__(self, args):
        self.args = args
        self.system = args.system
        self.ns = args.namespace
        self.params = pika.URLParameters(args.amqp_uri)
        self.user = self.params.credentials.username
        self.entities = {e: message_class(m) for e, m in args.entity}
        self.store = StoreFile(args.store)
        self.commands = queue.Queue()
        self.conn = None
        self.consuming = False  # commands run only while consuming (with a publisher channel)
        self.stopping = threading.Event()  # set at the end of stdin

    # -- the session --------------------------------------------------------------------------

    def run(self):
        threading.Thread(target=self.read_stdin, daemon=True).start()
        self.backoff = 0.1
        while not self.stopping.is_set():
            try:
                self.session()
            except pika.exceptions.AMQPError as e:
                log.warning("connection lost (%r); reconnecting in %.1f s", e, self.backoff)
                self.stopping.wait(self.backoff)  # cut short by a stop
                self.backoff = min(self.backoff * 2, 5.0)
            finally:
                if self.conn is not None and self.conn.is_open:
                    self.conn.close()

    def session(self):
        self.consuming = False
        self.conn = pika.BlockingConnection(self.params)
        inbox = f"{self.ns}.inbox.{self.system}"
        if not self.wait_for(inbox):
            return
        self.publisher = self.conn.channel()
        self.publisher.confirm_delivery()
        for item in list(self.store.data["outbox"]):
            self.publish_outbox(item)  # confirmed publishes interrupted last time
        self.consumer = self.conn.channel()
        self.consumer.basic_qos(prefetch_count=32)
        self.consumer.basic_consume(inbox, self.on_message)
        emit("ready", inbox=inbox)
        self.backoff = 0.1
        self.consuming = True
        # Runs first thing in start_consuming: the commands that came while connecting.
        self.conn.add_callback_threadsafe(self.drain_commands)
        self.consumer.start_consuming()

    def wait_for(self, inbox):
        """Waits until the router has declared the inbox (a passive check creates nothing);
        False if told to stop meanwhile."""
        while not self.stopping.is_set():
            channel = self.conn.channel()
            try:
                channel.queue_declare(inbox, passive=True)
                channel.close()
                return True
            except pika.exceptions.ChannelClosedByBroker as e:
                if e.reply_code != 404:
                    raise
                log.info("waiting for %s (is the router running with %s in its policy?)",
                         inbox, self.system)
                self.conn.sleep(0.5)
        return False

    # -- incoming -----------------------------------------------------------------------------

    def on_message(self, channel, method, props, body):
        try:
            report = self.apply(props, body)
        except Permanent as e:
            self.dead_letter(channel, method, body, e.reason, e.detail)
            return
        except OSError:
            log.exception("saving the store failed; the message is redelivered")
            self.store.reload()
            channel.basic_nack(method.delivery_tag, requeue=True)
            return
        channel.basic_ack(method.delivery_tag)
        emit(report[0], **report[1])

    def apply(self, props, body):
        """Applies one inbox message to the store and saves it; returns what to report."""
        if props.user_id != self.args.router_user:
            raise Permanent("untrusted_publisher",
                            f"published by {props.user_id!r}, not the router")
        ev = envelope.ChangeEvent()
        try:
            ev.ParseFromString(body)
        except DecodeError as e:
            raise Permanent("undecodable", str(e))
        data = self.store.data
        if ev.event_id in data["seen"]:
            return "duplicate", {"event_id": ev.event_id}
        cls = self.entities.get(ev.entity)
        if cls is None:
            raise Permanent("unknown_entity", f"entity {ev.entity!r} is not configured")
        if ev.op == OP_DELETE and not ev.HasField("record_clock"):
            raise Permanent("missing_clock", "a delete without record_clock")
        missing = [f for f in ev.field_mask if f not in ev.clocks]
        if missing:
            raise Permanent("missing_clock", f"no clock for {missing}")
        values = decode_fields(cls, ev.record, ev.field_mask)
        changed, stale = receive(data, self.system, ev, values, now_ms())
        remember(data, ev.event_id)
        self.store.save()
        return "applied", {"event_id": ev.event_id, "entity": ev.entity, "key": ev.key,
                           "origin": ev.origin, "changed": changed, "stale": stale}

    def dead_letter(self, channel, method, body, reason, detail):
        log.warning("dead-lettering: %s: %s", reason, detail)
        headers = {"concord-reason": reason, "concord-detail": detail[:MAX_DETAIL],
                   "concord-routing-key": method.routing_key}
        try:
            self.publisher.basic_publish(
                f"{self.ns}.dlx", self.system, body, mandatory=True,
                properties=pika.BasicProperties(
                    headers=headers, delivery_mode=2, user_id=self.user,
                    timestamp=int(time.time())))
            channel.basic_ack(method.delivery_tag)
        except (pika.exceptions.NackError, pika.exceptions.UnroutableError):
            # The inbox's own dead-letter settings take it (without the reason header).
            channel.basic_nack(method.delivery_tag, requeue=False)
        emit("dead_lettered", reason=reason, detail=detail)

    # -- local edits --------------------------------------------------------------------------

    def read_stdin(self):
        for line in sys.stdin:
            if line.strip():
                self.commands.put(line)
                self.wake()
        self.stopping.set()  # end of input: stop
        self.wake()

    def wake(self):
        """Has the connection's thread run the commands (pika is not thread-safe)."""
        conn = self.conn
        if conn is not None and conn.is_open:
            try:
                conn.add_callback_threadsafe(self.drain_commands)
            except pika.exceptions.AMQPError:
                pass  # reconnecting: the next session drains the queue

    def drain_commands(self):
        if not self.consuming:
            return  # not connected yet: the session drains the queue once it consumes
        while True:
            try:
                line = self.commands.get_nowait()
            except queue.Empty:
                break
            try:
                self.command(json.loads(line))
            except (ValueError, KeyError, TypeError, json_format.ParseError) as e:
                emit("error", detail=f"{e}", line=line.strip())
            except OSError as e:
                self.store.reload()
                emit("error", detail=f"saving the store: {e}", line=line.strip())
        if self.stopping.is_set():
            # Closing the connection then hands unacknowledged deliveries back to the inbox.
            self.consuming = False
            self.consumer.stop_consuming()

    def command(self, cmd):
        """`{"cmd": "edit", "entity": "customer", "key": "...", "fields": {"tier": "gold"}}`"""
        if cmd.get("cmd") != "edit":
            raise ValueError(f"unknown command {cmd.get('cmd')!r}")
        entity, key = cmd["entity"], cmd["key"]
        cls = self.entities.get(entity)
        if cls is None:
            raise ValueError(f"entity {entity!r} is not configured")
        values = normalize(cls, cmd["fields"])
        data = self.store.data
        publish, hlc, overruled = local_edit(data, self.system, entity, key, values, now_ms())
        if overruled:
            emit("overruled", entity=entity, key=key, fields=overruled)
        if not publish:
            self.store.save()
            return
        ev = envelope.ChangeEvent(
            event_id=uuid7(), source=self.system, entity=entity, key=key, op=OP_UPSERT,
            record=json_format.ParseDict(
                {k: v for k, v in publish.items() if v is not None}, cls()).SerializeToString(),
            field_mask=sorted(publish), schema_version=1, observed_at_ms=now_ms())
        for name in publish:
            clock = ev.clocks[name]
            clock.hlc, clock.system = hlc, self.system
        item = {"event_id": ev.event_id, "entity": entity, "key": key,
                "fields": sorted(publish),
                "body": base64.b64encode(ev.SerializeToString()).decode()}
        # The edit and its outbox entry are saved together; the entry goes once confirmed.
        data["outbox"].append(item)
        self.store.save()
        self.publish_outbox(item)

    def publish_outbox(self, item):
        """Publishes an outbox entry with a confirm, then removes it from the outbox."""
        entity, key = item["entity"], item["key"]
        self.publisher.basic_publish(
            f"{self.ns}.ingress", f"{self.system}.{entity}", base64.b64decode(item["body"]),
            mandatory=True,
            properties=pika.BasicProperties(
                content_type="application/x-protobuf", delivery_mode=2,
                message_id=item["event_id"], user_id=self.user,
                headers={"concord-key": f"{entity}/{key}"}, timestamp=int(time.time())))
        # Confirmed: basic_publish raises NackError or UnroutableError otherwise, and a lost
        # connection leaves the entry for the next session, which publishes it again.
        outbox = self.store.data["outbox"]
        outbox[:] = [o for o in outbox if o["event_id"] != item["event_id"]]
        self.store.save()
        emit("published", event_id=item["event_id"], entity=entity, key=key,
             fields=item["fields"])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--amqp-uri", default=os.environ.get("CONCORD_AMQP_URI"),
                   help="the system's broker URI (default: $CONCORD_AMQP_URI)")
    p.add_argument("--namespace", default="concord")
    p.add_argument("--system", required=True, help="the system's name in the policy")
    p.add_argument("--router-user", default="router",
                   help="the router's broker user: only its messages are applied")
    p.add_argument("--entity", action="append", required=True, metavar="NAME=MESSAGE",
                   type=lambda s: tuple(s.split("=", 1)),
                   help="an entity and its message, e.g. customer=seed.v1.Customer")
    p.add_argument("--gen", required=True, help="the directory of the generated *_pb2.py")
    p.add_argument("--store", required=True, help="the system's JSON file")
    args = p.parse_args(argv)
    if not args.amqp_uri:
        p.error("set --amqp-uri or CONCORD_AMQP_URI")
    return args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    args = parse_args(argv)
    load_generated(args.gen)
    Adapter(args).run()


if __name__ == "__main__":
    main()
