#!/usr/bin/env node
// The tutorial (the classic PyTorch one README.md names) replayed from Node.js, with nothing
// of gradwire's but its contract, proto/gradwire/v1/trainer.proto: what a service in another
// language does to drive a gradwire server. Then a few calls past the tutorial that such a
// service needs: the listing, an int64 read, a streamed read, a read as a typed array
// (wire.mjs), a typed write, a retried Step, errors, calls as messages on one stream, and the
// same calls in one Batch.
//
//   npm ci --prefix examples/node
//   node examples/node/tutorial.mjs localhost:50051 [--init random --seed 7] [--googleapis DIR]
//
// --googleapis names a folder holding google/rpc/status.proto and error_details.proto (the
// googleapis-common-protos package has them: `make setup` installs it). With it, errors show
// the reason gradwire puts in the `grpc-status-details-bin` trailer; without, code and message.
// --json prints one JSON object instead of the transcript (tests/test_node_client.py reads it).

import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';

import grpc from '@grpc/grpc-js';
import protobuf from 'protobufjs';

import { CHANNEL_OPTIONS, Trainer } from './contract.mjs';
import { withTensorViews } from './wire.mjs';

const LR = 1.0;
const FILL_VALUE = 0.1;
const BATCH = 8;

const { values: options, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    init: { type: 'string', default: 'fill' },
    seed: { type: 'string', default: '0' },
    googleapis: { type: 'string' },
    json: { type: 'boolean', default: false },
  },
});
const target = positionals[0] ?? 'localhost:50051';
if (!['fill', 'random'].includes(options.init)) {
  console.error(`--init must be fill or random, not ${options.init}`);
  process.exit(2);
}

const trainer = new Trainer(target, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
// The same service, GetTensor's values as typed arrays (wire.mjs).
const viewer = new (withTensorViews(Trainer))(target, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);

// google.rpc.Status and ErrorInfo, to read the reason of an error.
let Status = null;
let ErrorInfo = null;
if (options.googleapis) {
  const root = new protobuf.Root();
  root.resolvePath = (origin, file) => path.join(options.googleapis, file);
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  Status = root.lookupType('google.rpc.Status');
  ErrorInfo = root.lookupType('google.rpc.ErrorInfo');
}

/** One unary call, with a deadline, as a promise. */
function call(method, request = {}, metadata = new grpc.Metadata(), client = trainer) {
  return new Promise((resolve, reject) => {
    const deadline = Date.now() + 30_000;
    client[method](request, metadata, { deadline }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

/** A server-streaming call, its messages collected. */
function collect(method, request) {
  return new Promise((resolve, reject) => {
    const messages = [];
    const stream = trainer[method](request, new grpc.Metadata(), { deadline: Date.now() + 30_000 });
    stream.on('data', (message) => messages.push(message));
    stream.on('error', reject);
    stream.on('end', () => resolve(messages));
  });
}

/** A failed call as the contract describes it: status, message and ErrorInfo's reason. */
function explain(error) {
  if (error.code === undefined) throw error; // not a gRPC error: a bug here, not the server's
  const [details] = error.metadata?.get('grpc-status-details-bin') ?? [];
  return described(error.code, error.details, details);
}

/** Status code, message, and the reason in `details` (a serialized google.rpc.Status). */
function described(code, message, details) {
  const out = { code: grpc.status[code], message };
  if (details && Status) {
    for (const any of Status.decode(details).details) {
      if (any.type_url === 'type.googleapis.com/google.rpc.ErrorInfo') {
        const info = ErrorInfo.decode(any.value);
        Object.assign(out, { reason: info.reason, domain: info.domain });
      }
    }
  }
  return out;
}

/** CallRequests sent on one Calls stream, all at once, and their answers: one each, in
 *  order. The stream is ended once the last has come. */
function onOneStream(requests) {
  return new Promise((resolve, reject) => {
    const answers = [];
    const stream = trainer.Calls(new grpc.Metadata(), { deadline: Date.now() + 30_000 });
    stream.on('data', (answer) => {
      answers.push(answer);
      if (answers.length === requests.length) stream.end();
    });
    stream.on('error', reject);
    stream.on('end', () => resolve(answers));
    for (const request of requests) stream.write(request);
  });
}

/** A CallResponse's error, as `explain` reads a unary call's. */
function answeredError(answer) {
  if (!Status) return { code: 'an error (--googleapis decodes it)' };
  const status = Status.decode(answer.error);
  return described(status.code, status.message, answer.error);
}

/** The call's error, explained; null when it succeeded. */
async function failure(method, request, metadata) {
  try {
    await call(method, request, metadata);
    return null;
  } catch (error) {
    return explain(error);
  }
}

// Each dtype's values travel in the typed field the contract names; float16 and bfloat16 in
// raw_values, as little-endian 16-bit words.
const FIELD = {
  DTYPE_FLOAT32: 'float_values',
  DTYPE_FLOAT64: 'double_values',
  DTYPE_INT32: 'int32_values',
  DTYPE_INT64: 'int64_values',
  DTYPE_BOOL: 'bool_values',
};

/** A Tensor message as {dtype, shape, values}; null when absent (a gradient before Backward). */
function tensor(message) {
  if (!message) return null;
  const field = FIELD[message.dtype];
  let values;
  if (field === undefined) {
    const raw = message.raw_values;
    values = Array.from({ length: raw.length / 2 }, (_, i) => raw.readUInt16LE(2 * i));
  } else if (message.dtype === 'DTYPE_INT64') {
    values = message[field].map(BigInt); // exact, however large
  } else {
    values = message[field];
  }
  return { dtype: message.dtype, shape: message.shape.map(Number), values };
}

// numpy basic indexing as messages: x[0][0][0] is three indexes, x[:2, :3] one of two items.
const at = (i) => ({ at: i });
const slice = (start, stop) => ({ slice: { start, stop } });
const index = (...items) => ({ items });

async function read(name, ...indexes) {
  const response = await call('GetTensor', { name, index: indexes });
  return tensor(response.tensor);
}

/** A float32 tensor's values with `lr * grad` taken off, in float32. With lr 1.0 the product
 *  is exact and the subtraction rounds once, as torch's `add_` does; other rates may differ
 *  from torch in the last bit (torch may fuse the multiply and add). */
function sgd(weight, grad) {
  return weight.values.map((w, i) => Math.fround(w - Math.fround(LR * grad.values[i])));
}

const sameValues = (a, b) => a.length === b.length && a.every((v, i) => Object.is(v, b[i]));

const transcript = [];
function show(code, value) {
  transcript.push(`>>> ${code}`);
  if (value !== undefined) transcript.push(format(value));
}
function format(value) {
  if (value === null) return 'None';
  if (value?.values) {
    const shown = value.values.slice(0, 6).map((v) => (value.dtype === 'DTYPE_FLOAT32' ? float32(v) : v));
    const more = value.values.length > 6 ? ', ...' : '';
    return `${value.dtype} [${value.shape.join(', ')}]: ${shown.join(', ')}${more}`;
  }
  return String(value);
}

/** The shortest decimal that reads back as the same float32, as numpy prints it. */
function float32(v) {
  for (let digits = 1; digits < 9; digits += 1) {
    const short = Number(v.toPrecision(digits));
    if (Math.fround(short) === v) return short;
  }
  return v;
}

async function tutorial() {
  if (options.init === 'fill') {
    await call('Reset');
    await call('FillParameters', { value: FILL_VALUE });
    show(`model = Simple(); for m in model.parameters(): m.data.fill_(${FILL_VALUE})`);
  } else {
    await call('Reset', { seed: options.seed });
    show(`torch.manual_seed(${options.seed}); model = Simple()`);
  }
  await call('SetOptimizer', { config: { kind: 'OPTIMIZER_KIND_SGD', lr: LR } });
  show(`optimizer = torch.optim.SGD(model.parameters(), lr=${LR.toFixed(1)})`);

  const forward = await call('Forward', {
    input: { fill: { kind: 'KIND_ONES', shape: [BATCH, 3, 10, 10] } },
    target: { fill: { kind: 'KIND_ONES', shape: [BATCH], dtype: 'DTYPE_INT64' } },
  });
  show('output = model(images); loss = criterion(output, targets); print(loss.item())', forward.loss);
  const gradBefore = await read('conv1.weight.grad');
  show('print(model.conv1.weight.grad)', gradBefore);

  await call('Backward');
  show('loss.backward()');
  const gradSlice = await read('conv1.weight.grad', index(at(0)), index(at(0)), index(at(0)));
  show('print(model.conv1.weight.grad[0][0][0])', gradSlice);
  const linearRows = await read('linear.weight.grad', index(slice(undefined, 2), slice(undefined, 3)));
  show('print(model.linear.weight.grad[:2, :3])', linearRows);
  const weightSliceBefore = await read('conv1.weight', index(at(0)), index(at(0)), index(at(0)));
  const weightBefore = await read('conv1.weight');
  const grad = await read('conv1.weight.grad');

  // A Step sent twice with one request id, as a client retrying after a lost reply would:
  // the server applies it once and answers the retry as it answered the first.
  const retry = new grpc.Metadata();
  retry.set('gradwire-request-id', randomBytes(16).toString('hex'));
  const step = await call('Step', {}, retry);
  const stepAgain = await call('Step', {}, retry);
  show('optimizer.step()');
  const weightSliceAfter = await read('conv1.weight', index(at(0)), index(at(0)), index(at(0)));
  show('print(model.conv1.weight[0][0][0])', weightSliceAfter);
  const weightAfter = await read('conv1.weight');
  const identity = sameValues(weightAfter.values, sgd(weightBefore, grad));
  transcript.push(`# weight after step == weight before - lr * grad, bit for bit: ${identity}`);

  await call('ZeroGrad');
  const gradAfterZero = await read('conv1.weight.grad');
  show('optimizer.zero_grad(); print(model.conv1.weight.grad)', gradAfterZero);

  return {
    output_shape: forward.output_shape.map(Number),
    loss: forward.loss,
    grad_before_backward: gradBefore,
    grad_slice: gradSlice,
    linear_grad_rows: linearRows,
    weight_slice_before: weightSliceBefore,
    weight_before: weightBefore,
    grad,
    steps: [step, stepAgain].map((s) => ({
      version: Number(s.version),
      parameters_updated: Number(s.parameters_updated),
    })),
    weight_slice_after: weightSliceAfter,
    weight_after: weightAfter,
    identity_holds: identity,
    grad_after_zero: gradAfterZero,
  };
}

async function pastTheTutorial() {
  const listing = await call('ListTensors');
  transcript.push(`# ${listing.model} on ${listing.device}: ${listing.tensors.length} tensors`);
  // The server's own limits, rather than the defaults the .proto's comments give: above
  // max_value_bytes a value travels in chunks (GetTensorStream, SetTensorStream).
  const info = await call('GetServerInfo');
  const { limits } = info;
  transcript.push(
    `# gradwire ${info.version} with PyTorch ${info.torch_version}; values over ` +
      `${limits.max_value_bytes} bytes stream; ${limits.max_concurrent} calls at once`,
  );

  // int64 values arrive as strings (longs: String) and become BigInt: exact.
  const targets = await read('target');

  // A read in chunks of 64 KiB, put back together by offset: what a client does above the
  // message limit. Every chunk carries the version the read was taken at.
  const chunks = await collect('GetTensorStream', { name: 'linear.weight', chunk_bytes: 65536 });
  const whole = await read('linear.weight');
  const streamed = new Array(whole.values.length);
  for (const message of chunks) {
    const { offset, values } = message.chunk;
    tensor(values).values.forEach((v, i) => (streamed[Number(offset) + i] = v));
  }
  transcript.push(`# linear.weight in ${chunks.length} chunks: ${sameValues(streamed, whole.values)}`);
  const viewed = (await call('GetTensor', { name: 'linear.weight' }, undefined, viewer)).tensor;
  const viewedSame = viewed.values instanceof Float32Array && sameValues(viewed.values, whole.values);
  transcript.push(`# linear.weight read through wire.mjs as a Float32Array: ${viewedSame}`);

  // A typed write of one row, read back.
  const row = [1.5, -2.25, 3.125];
  const write = await call('SetTensor', {
    name: 'conv1.weight',
    index: [index(at(0), at(0), at(0))],
    value: { tensor: { dtype: 'DTYPE_FLOAT32', shape: [3], float_values: row } },
  });
  const written = await read('conv1.weight', index(at(0), at(0), at(0)));

  // Errors: a status a program can branch on, a reason that names the case, a message for people.
  const stale = new grpc.Metadata();
  stale.set('gradwire-expected-version', String(Number(write.version) - 1));
  // A version counts one server's changes: one started again counts afresh. The instance id,
  // read before the state (GetServerInfo, above), names the server a version came from; here
  // one that is not this server's, as after a restart.
  const restarted = new grpc.Metadata();
  restarted.set('gradwire-expected-version', String(write.version));
  const another = info.instance_id === '0'.repeat(16) ? '1'.repeat(16) : '0'.repeat(16);
  restarted.set('gradwire-expected-instance', another);
  const errors = {
    unknown_name: await failure('GetTensor', { name: 'conv1.wieght' }),
    past_the_end: await failure('GetTensor', { name: 'conv1.weight', index: [index(at(16))] }),
    backward_again: await failure('Backward'),
    stale_version: await failure('FillParameters', { value: 0 }, stale),
    another_instance: await failure('FillParameters', { value: 0 }, restarted),
    bad_shape: await failure('Forward', {
      input: { tensor: { dtype: 'DTYPE_FLOAT32', shape: [1, 3], float_values: [1, 2, 3] } },
    }),
  };
  for (const [name, error] of Object.entries(errors)) {
    transcript.push(`# ${name}: ${[error?.code, error?.reason, error?.message].filter(Boolean).join(' ')}`);
  }

  // The tutorial's calls again, as messages on one open stream (Calls), all sent at once: a
  // Step retried with its request id, a Backward whose graph is gone, whose error ends that
  // call alone, and a Step sent to run only if that Backward succeeded, which is not run.
  const eightCalls = (stepId) => [
    {
      forward: {
        input: { fill: { kind: 'KIND_ONES', shape: [BATCH, 3, 10, 10] } },
        target: { fill: { kind: 'KIND_ONES', shape: [BATCH], dtype: 'DTYPE_INT64' } },
      },
    },
    { backward: {} },
    { step: {}, request_id: stepId },
    { step: {}, request_id: stepId },
    { get_tensor: { name: 'conv1.weight', index: [index(at(0)), index(at(0)), index(at(0))] } },
    { backward: {} },
    { step: {}, if_previous_succeeded: true },
    { list_tensors: {} },
  ];
  const answers = await onOneStream(eightCalls(randomBytes(16).toString('hex')));
  const results = answers.map((a) => a.result);
  transcript.push(`# on one stream: ${results.join(', ')}`);
  // What a unary read sees now, which the stream's read must have seen.
  const readAfterStream = tensor(
    (await call('GetTensor', { name: 'conv1.weight', index: [index(at(0)), index(at(0)), index(at(0))] }))
      .tensor,
  ).values;
  // And the same calls in one unary call (Batch), as a client that has no streams would
  // make them: one answer each, in order, in one message.
  const batched = (await call('Batch', { calls: eightCalls(randomBytes(16).toString('hex')) }))
    .answers;
  transcript.push(`# in one batch: ${batched.map((a) => a.result).join(', ')}`);

  return {
    listing: {
      model: listing.model,
      device: listing.device,
      sample_shape: listing.sample_shape.map(Number),
      outputs: Number(listing.outputs),
      names: listing.tensors.map((t) => t.name),
    },
    info: {
      version: info.version,
      torch_version: info.torch_version,
      device: info.device,
      max_value_bytes: Number(limits.max_value_bytes),
      max_elements: Number(limits.max_elements),
      max_concurrent: limits.max_concurrent,
      session_idle_timeout_s: limits.session_idle_timeout_s,
    },
    targets: { ...targets, values: targets.values.map(String) }, // exact, as decimal strings
    stream: {
      chunks: chunks.length,
      offsets: chunks.map((m) => Number(m.chunk.offset)),
      versions: chunks.map((m) => Number(m.version)),
      full_shape: chunks[0].full_shape.map(Number),
      equal_to_unary: sameValues(streamed, whole.values),
      values: streamed,
    },
    viewed: { shape: viewed.shape, equal_to_decoded: viewedSame },
    set: { version: Number(write.version), written: written.values },
    errors,
    calls: {
      results,
      forward_version: Number(answers[0].forward.version),
      backward_version: Number(answers[1].backward.version),
      steps: [answers[2].step, answers[3].step].map((s) => ({
        version: Number(s.version),
        parameters_updated: Number(s.parameters_updated),
      })),
      read: tensor(answers[4].get_tensor.tensor).values,
      read_after: readAfterStream,
      error: answeredError(answers[5]),
      skipped: answeredError(answers[6]),
      listed_version: Number(answers[7].list_tensors.version),
    },
    batch: {
      results: batched.map((a) => a.result),
      forward_version: Number(batched[0].forward.version),
      steps: [batched[2].step, batched[3].step].map((s) => ({
        version: Number(s.version),
        parameters_updated: Number(s.parameters_updated),
      })),
      read: tensor(batched[4].get_tensor.tensor).values,
      error: answeredError(batched[5]),
      skipped: answeredError(batched[6]),
      listed_version: Number(batched[7].list_tensors.version),
    },
  };
}

try {
  const result = { ...(await tutorial()), ...(await pastTheTutorial()) };
  if (options.json) {
    console.log(JSON.stringify(result));
  } else {
    console.log(transcript.join('\n'));
  }
} catch (error) {
  console.error(error.code === undefined ? error : `${target}: ${JSON.stringify(explain(error))}`);
  process.exitCode = 1;
} finally {
  trainer.close();
  viewer.close();
}
