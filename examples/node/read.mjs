#!/usr/bin/env node
// Reads one tensor from a gradwire server, its values as a typed array
// (wire.mjs), and prints its dtype, shape and first values; --json prints all of them.
//
//   node examples/node/read.mjs localhost:50051 conv1.weight [--json]
//
// int64 values print as decimal strings (exact); float16 and bfloat16 as their 16-bit words.

import { parseArgs } from 'node:util';

import grpc from '@grpc/grpc-js';

import { CHANNEL_OPTIONS, Trainer } from './contract.mjs';
import { withTensorViews } from './wire.mjs';

const { values: options, positionals } = parseArgs({
  allowPositionals: true,
  options: { json: { type: 'boolean', default: false } },
});
if (positionals.length !== 2) {
  console.error('usage: read.mjs HOST:PORT NAME [--json]');
  process.exit(2);
}
const [target, name] = positionals;
const trainer = new (withTensorViews(Trainer))(target, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);

trainer.GetTensor({ name }, { deadline: Date.now() + 60_000 }, (error, reply) => {
  trainer.close();
  if (error) {
    console.error(`${target}: ${grpc.status[error.code]}: ${error.details}`);
    process.exitCode = 1;
    return;
  }
  const { tensor } = reply;
  if (options.json) {
    const values = tensor && Array.from(tensor.values, (v) => (typeof v === 'bigint' ? String(v) : v));
    console.log(JSON.stringify({ ...reply, tensor: tensor && { ...tensor, values } }));
  } else if (tensor === null) {
    console.log(`${name}: absent (version ${reply.version})`);
  } else {
    const first = Array.from(tensor.values.subarray(0, 6)).join(', ');
    const more = tensor.values.length > 6 ? ', ...' : '';
    console.log(`${name}: ${tensor.dtype} [${tensor.shape.join(', ')}] ${tensor.values.constructor.name}`);
    console.log(`  ${first}${more}`);
  }
});
