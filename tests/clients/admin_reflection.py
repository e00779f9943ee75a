#!/usr/bin/env python3
"""A client of the controller's Admin API in another language, with no generated code: it
discovers the services and message types through gRPC server reflection on the admin socket,
then calls ListNodes, GetNode and PlanCluster and prints what it read as JSON.

usage: admin_reflection.py ADMIN_SOCKET NODE_NAME
"""
import json
import sys

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def main() -> int:
    sock, node = sys.argv[1], sys.argv[2]
    # Over a Unix socket grpc-core would send the socket path as :authority, which HTTP/2 servers
    # reject; name the (local) authority explicitly.
    channel = grpc.insecure_channel(f"unix://{sock}", options=[("grpc.default_authority", "localhost")])
    db = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(db.get_services())
    pool = DescriptorPool(db)
    admin = pool.FindServiceByName("fleetadm.v1.Admin")

    def call(method: str, **fields):
        m = admin.FindMethodByName(method)
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        rpc = channel.unary_unary(
            f"/{admin.full_name}/{method}",
            request_serializer=req.SerializeToString,
            response_deserializer=resp.FromString,
        )
        return json_format.MessageToDict(rpc(req(**fields), timeout=10), preserving_proto_field_name=True)

    out = {
        "services": services,
        "methods": sorted(m.name for m in admin.methods),
        "nodes": call("ListNodes"),
        "node": call("GetNode", name=node),
        "plan": call("PlanCluster", name="py", masters=[node], vip="10.103.97.2", max_parallel="1"),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
