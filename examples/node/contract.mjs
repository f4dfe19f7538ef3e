// gradwire's contract, loaded from proto/gradwire/v1/trainer.proto at run time: the Trainer
// client class and the channel options every example here uses.

import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

export const PROTO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'proto');

// keepCase: the .proto's own field names; longs as strings: int64 values stay exact in
// JavaScript; enums by name.
export const definition = protoLoader.loadSync('gradwire/v1/trainer.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});

/** The Trainer service's client class, messages decoded by proto-loader. */
export const { Trainer } = grpc.loadPackageDefinition(definition).gradwire.v1;

/** gRPC clients take at most 4 MiB per message by default; gradwire's server sends up to
 *  64 MiB in one reply (larger tensors stream), so a client reading tensors raises its limit
 *  to match (client/gradwire/limits.py). */
export const CHANNEL_OPTIONS = {
  'grpc.max_receive_message_length': 64 * 1024 * 1024,
  'grpc.max_send_message_length': 64 * 1024 * 1024,
};
