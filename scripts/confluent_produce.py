"""Writes transaction events to Kafka with Confluent's own serializers.

Reads JSON events, one per line, from standard input, and produces each
one keyed by its id, serialized by confluent-kafka's AvroSerializer,
ProtobufSerializer or JSONSerializer with the repository's schemas
(registered by the serializer itself under `<topic>-<format>`), or as plain
JSON. The tests use it to check that txnflow reads what Confluent's
producers write, not only what txnflow's own encoder writes.

    confluent_produce.py --brokers B --registry URL --topic T --format avro < events.jsonl
"""

import argparse
import datetime
import decimal
import json
import pathlib
import subprocess
import sys
import tempfile

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.serialization import MessageField, SerializationContext

SCHEMAS = pathlib.Path(__file__).resolve().parent.parent / "schemas"


def protobuf_module():
    """The Python class of schemas/transaction.proto, compiled by protoc."""
    out = pathlib.Path(tempfile.mkdtemp(prefix="txnflow-proto-"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{SCHEMAS}", f"--python_out={out}", "transaction.proto"],
        check=True,
    )
    sys.path.insert(0, str(out))
    import transaction_pb2

    return transaction_pb2


def avro_record(event):
    amount = decimal.Decimal(str(event["amount"])).quantize(decimal.Decimal("0.01"))
    timestamp = datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    if timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=datetime.timezone.utc)
    return {
        "id": str(event["id"]),
        "description": event["description"],
        "amount": amount,
        "timestamp": timestamp,
        "merchant": event.get("merchant"),
        "operation_type": event["operation_type"],
        "side": event["side"].lower(),
        "processing_type": event.get("processing_type"),
        "run_id": event.get("run_id"),
        "batch_id": event.get("batch_id"),
    }


def protobuf_message(module, event):
    message = module.Transaction(
        id=str(event["id"]),
        description=event["description"],
        amount=str(decimal.Decimal(str(event["amount"])).quantize(decimal.Decimal("0.01"))),
        timestamp=event["timestamp"],
        operation_type=event["operation_type"],
        side=module.Side.Value(event["side"].upper()),
    )
    for field in ("merchant", "run_id", "batch_id"):
        if event.get(field) is not None:
            setattr(message, field, event[field])
    return message


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--format", choices=["avro", "protobuf", "json_schema", "json"], required=True)
    args = parser.parse_args()

    registry = SchemaRegistryClient({"url": args.registry})
    subject = {"subject.name.strategy": lambda ctx, record_name: f"{ctx.topic}-{args.format}"}
    if args.format == "avro":
        from confluent_kafka.schema_registry.avro import AvroSerializer

        serializer = AvroSerializer(registry, (SCHEMAS / "transaction.avsc").read_text(), lambda e, ctx: avro_record(e), subject)
    elif args.format == "protobuf":
        from confluent_kafka.schema_registry.protobuf import ProtobufSerializer

        module = protobuf_module()
        conf = dict(subject, **{"use.deprecated.format": False})
        proto = ProtobufSerializer(module.Transaction, registry, conf)
        serializer = lambda event, ctx: proto(protobuf_message(module, event), ctx)
    elif args.format == "json_schema":
        from confluent_kafka.schema_registry.json_schema import JSONSerializer

        serializer = JSONSerializer((SCHEMAS / "transaction.schema.json").read_text(), registry, lambda e, ctx: e, subject)
    else:
        serializer = lambda event, ctx: json.dumps(event).encode()

    producer = Producer({"bootstrap.servers": args.brokers, "enable.idempotence": True})
    failed = []
    sent = 0
    for line in sys.stdin:
        event = json.loads(line)
        context = SerializationContext(args.topic, MessageField.VALUE)
        producer.produce(
            args.topic,
            key=str(event["id"]).encode(),
            value=serializer(event, context),
            on_delivery=lambda error, _: failed.append(error) if error else None,
        )
        producer.poll(0)
        sent += 1
    producer.flush(60)
    if failed:
        sys.exit(f"{len(failed)} records not delivered: {failed[0]}")
    print(f"produced {sent} records as {args.format}")


if __name__ == "__main__":
    main()
