#!/usr/bin/env node
// For `make bench` (bench/bench.py runs this): what a Node.js client pays to read a tensor of
// 16 MiB, against a bare gRPC call returning 16 MiB of bytes on the same channel, from the
// benchmark server's floor service (bench/floor.py). Prints one JSON object of medians in
// milliseconds: per dtype, the read with its values as a typed array (wire.mjs); for float32
// also the read decoded by proto-loader, value by value.
// Each figure alternates with its floor in blocks of calls (see `blocked`).
//
//   node examples/node/bench.mjs HOST:PORT [--repeats 15]

import { parseArgs } from 'node:util';

import grpc from '@grpc/grpc-js';

import { CHANNEL_OPTIONS, Trainer } from './contract.mjs';
import { withTensorViews } from './wire.mjs';

const { values: options, positionals } = parseArgs({
  allowPositionals: true,
  options: { repeats: { type: 'string', default: '15' } },
});
const [target] = positionals;
const repeats = Number(options.repeats);
if (positionals.length !== 1 || !(Number.isInteger(repeats) && repeats > 0)) {
  console.error('usage: bench.mjs HOST:PORT [--repeats N], N a whole number above 0');
  process.exit(2);
}
const SIZE = 16 * 1024 * 1024;
// The benchmark server's tensors of 16 MiB (bench/server.py).
const TYPED = { f32: 'float32', f64: 'float64', i32: 'int32', i64: 'int64', f16: 'float16 (raw)' };

const credentials = grpc.credentials.createInsecure();
// Three clients of one target and options share one connection (grpc-js's subchannel pool),
// as the Python benchmark's calls share one channel.
const shared = CHANNEL_OPTIONS;
const decoded = new Trainer(target, credentials, shared);
const viewed = new (withTensorViews(Trainer))(target, credentials, shared);
const same = (bytes) => bytes;
const Floor = grpc.makeGenericClientConstructor({
  Blob: {
    path: '/gradwire.bench.Floor/Blob',
    requestStream: false,
    responseStream: false,
    requestSerialize: same,
    requestDeserialize: same,
    responseSerialize: same,
    responseDeserialize: same,
  },
});
const floor = new Floor(target, credentials, shared);

const unary = (client, method, request) =>
  new Promise((resolve, reject) =>
    client[method](request, (error, reply) => (error ? reject(error) : resolve(reply))),
  );
const floorRead = () => unary(floor, 'Blob', Buffer.from(String(SIZE)));

async function timed(call) {
  const start = process.hrtime.bigint();
  await call();
  return Number(process.hrtime.bigint() - start) / 1e6;
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = sorted.length >> 1;
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

/** Medians of `repeats` calls of each, in alternating blocks of 5, each block's first call
 *  untimed. Not call by call: reading 16 MiB leaves work behind in both processes (memory to
 *  free, a collection in V8) that lands on the next call; alternated call by call, a
 *  gradwire read and the floor's after it shared their time differently by dtype (float32:
 *  90 and 50 ms, float64: 68 and 68), each pair taking 135-140 ms. In blocks, each call
 *  follows one of its own kind. */
async function blocked(ours, bare, block = 5) {
  const a = [];
  const b = [];
  while (a.length < repeats) {
    for (const [call, times] of [[ours, a], [bare, b]]) {
      await call();
      for (let i = 1; i < block && times.length < repeats; i += 1) times.push(await timed(call));
    }
  }
  return { ours: median(a), floor: median(b) };
}

const result = { node: process.version, viewed: {}, decoded: {} };
for (const [name, dtype] of Object.entries(TYPED)) {
  const reply = await unary(viewed, 'GetTensor', { name });
  if (reply.tensor.values.byteLength !== SIZE) throw new Error(`${name} is not 16 MiB`);
  result.viewed[dtype] = await blocked(() => unary(viewed, 'GetTensor', { name }), floorRead);
}
result.decoded.float32 = await blocked(() => unary(decoded, 'GetTensor', { name: 'f32' }), floorRead);
console.log(JSON.stringify(result));
for (const client of [decoded, viewed, floor]) client.close();
