// wire.mjs on messages built byte by byte, in every form protobuf allows a sender, checked
// against protobufjs's own decoding where it decodes them right. Run: node --test examples/node
// (tests/test_node_client.py does).

import assert from 'node:assert/strict';
import { test } from 'node:test';

import path from 'node:path';

import protobuf from 'protobufjs';

import { PROTO_ROOT } from './contract.mjs';
import { getTensorResponse, tensor } from './wire.mjs';

const Response = new protobuf.Root()
  .loadSync(path.join(PROTO_ROOT, 'gradwire', 'v1', 'trainer.proto'), { keepCase: true })
  .lookupType('gradwire.v1.GetTensorResponse');

// --- a small protobuf writer ------------------------------------------------------------

function varint(value) {
  const out = [];
  let v = BigInt(value);
  if (v < 0n) v += 1n << 64n;
  do {
    const byte = Number(v & 0x7fn);
    v >>= 7n;
    out.push(v ? byte | 0x80 : byte);
  } while (v);
  return out;
}
const key = (number, type) => varint(number * 8 + type);
const len = (number, bytes) => [...key(number, 2), ...varint(bytes.length), ...bytes];
const int = (number, value) => [...key(number, 0), ...varint(value)];
const le = (Array, values) => [...new Uint8Array(Array.from(values).buffer)];
const packed = (number, Array, values) => len(number, le(Array, values));

/** Bytes placed at `offset` of their own buffer, to choose how the values are aligned. */
function at(offset, bytes) {
  const buffer = new Uint8Array(offset + bytes.length);
  buffer.set(bytes, offset);
  return buffer.subarray(offset);
}

const FLOATS = [1.5, -2.25, 3.125, 0, -0, 7e-8];

test('float32 values aligned in the reply are a view of its bytes, with no copy', () => {
  // Names of 1 to 4 letters move the values through the four alignments: one gives a view.
  let views = 0;
  for (let letters = 1; letters <= 4; letters += 1) {
    const t = [...int(1, 1), ...len(2, varint(6)), ...packed(3, Float32Array, FLOATS)];
    const bytes = at(8, [...int(1, 3), ...len(2, Array(letters).fill(0x61)), ...len(3, t)]);
    const reply = getTensorResponse(bytes);
    assert.deepEqual(Array.from(reply.tensor.values), FLOATS.map(Math.fround));
    assert.equal(reply.name, 'a'.repeat(letters));
    if (reply.tensor.values.buffer === bytes.buffer) {
      views += 1;
      assert.equal(reply.tensor.values.byteOffset % 4, 0);
      bytes[bytes.length - 1] ^= 0x80; // the last value's sign bit: the view sees it
      assert.equal(reply.tensor.values.at(-1), -Math.fround(FLOATS.at(-1)));
    }
  }
  assert.equal(views, 1);
});

test('every dtype, aligned or not, reads as protobufjs decodes it', () => {
  const cases = [
    [1, 3, Float32Array, FLOATS, 'float_values'],
    [2, 4, Float64Array, [1e300, -5e-324, 0.1], 'double_values'],
    [5, 5, Int32Array, [-(2 ** 31), 2 ** 31 - 1, -1, 0], 'int32_values'],
    [6, 6, BigInt64Array, [-(2n ** 63n), 2n ** 63n - 1n, -1n, 2n ** 53n + 1n], 'int64_values'],
  ];
  for (const [dtype, number, Typed, values, field] of cases) {
    const message = [...int(1, dtype), ...len(2, varint(values.length)), ...packed(number, Typed, values)];
    for (let offset = 0; offset < 8; offset += 1) {
      const bytes = at(offset, [...int(1, 9), ...len(3, message), ...len(4, varint(values.length))]);
      const reply = getTensorResponse(bytes);
      const expected = Response.decode(bytes).tensor[field].map(String);
      assert.ok(reply.tensor.values instanceof Typed);
      assert.deepEqual(Array.from(reply.tensor.values, String), expected);
      assert.equal(reply.version, 9);
      assert.deepEqual(reply.tensor.shape, [values.length]);
      assert.deepEqual(reply.full_shape, [values.length]);
    }
  }
});

test('values sent unpacked, or packed in several pieces, read as one array', () => {
  const f = FLOATS.map(Math.fround);
  const unpacked = f.flatMap((v) => [...key(3, 5), ...le(Float32Array, [v])]);
  const split = [...packed(3, Float32Array, f.slice(0, 2)), ...packed(3, Float32Array, f.slice(2))];
  const mixed = [...packed(3, Float32Array, f.slice(0, 3)), ...unpacked.slice(3 * 5)];
  for (const values of [unpacked, split, mixed]) {
    const t = tensor(Uint8Array.from([...int(1, 1), ...values]));
    assert.deepEqual(Array.from(t.values), f);
  }
  const longs = [5n, -7n].flatMap((v) => [...key(6, 1), ...le(BigInt64Array, [v])]);
  assert.deepEqual(Array.from(tensor(Uint8Array.from([...int(1, 6), ...longs])).values), [5n, -7n]);
});

test('a tensor field sent twice is merged; raw_values sent twice, the last wins', () => {
  const first = [...int(1, 3), ...len(2, varint(2))];
  const second = len(8, le(Uint16Array, [0x3c00, 0xc000]));
  const reply = getTensorResponse(Uint8Array.from([...len(3, first), ...len(3, second)]));
  assert.equal(reply.tensor.dtype, 'DTYPE_FLOAT16');
  assert.deepEqual(reply.tensor.shape, [2]);
  assert.deepEqual(Array.from(reply.tensor.values), [0x3c00, 0xc000]);

  const twice = [...int(1, 4), ...len(8, le(Uint16Array, [1, 2])), ...len(8, le(Uint16Array, [3]))];
  assert.deepEqual(Array.from(tensor(Uint8Array.from(twice)).values), [3]);
});

test('the values field is the one its dtype names; a second one is an error', () => {
  const wrong = [...int(1, 2), ...packed(3, Float32Array, [1])];
  assert.throws(() => tensor(Uint8Array.from(wrong)), /DTYPE_FLOAT64 travels in field 4/);
  const both = [...int(1, 2), ...packed(3, Float32Array, [1]), ...packed(4, Float64Array, [7])];
  assert.throws(() => tensor(Uint8Array.from(both)), /more than one values field/);
});

test('unknown fields of every wire type, groups included, are skipped', () => {
  const unknown = [
    ...int(20, 300),
    ...key(21, 1), ...Array(8).fill(9),
    ...len(22, [1, 2, 3]),
    ...key(23, 3), ...int(1, 5), ...len(2, [4]), ...key(24, 3), ...key(24, 4), ...key(23, 4),
    ...key(25, 5), ...Array(4).fill(9),
  ]; // prettier-ignore
  const t = [...unknown, ...int(1, 1), ...unknown, ...packed(3, Float32Array, [2]), ...unknown];
  const reply = getTensorResponse(Uint8Array.from([...unknown, ...len(3, t), ...unknown, ...int(1, 4)]));
  assert.deepEqual(Array.from(reply.tensor.values), [2]);
  assert.equal(reply.version, 4);
});

test('a known field with another wire type is skipped as unknown', () => {
  const t = [...len(1, [2]), ...int(1, 1), ...packed(3, Float32Array, [2])];
  assert.equal(tensor(Uint8Array.from(t)).dtype, 'DTYPE_FLOAT32');
});

test('bools are varints: any nonzero one is true, packed or not', () => {
  const packedBools = len(7, [1, 0, ...varint(300), 1]);
  const loose = [...int(7, 0), ...int(7, 2)];
  const t = tensor(Uint8Array.from([...int(1, 7), ...packedBools, ...loose]));
  assert.deepEqual(Array.from(t.values), [1, 0, 1, 1, 0, 1]);
});

test('empty tensors, absent tensors and unknown dtypes', () => {
  const empty = tensor(Uint8Array.from([...int(1, 1), ...len(2, [2, 0])]));
  assert.deepEqual(empty.shape, [2, 0]);
  assert.ok(empty.values instanceof Float32Array && empty.values.length === 0);
  assert.equal(getTensorResponse(Uint8Array.from(int(1, 3))).tensor, null);
  assert.equal(tensor(Uint8Array.from([...int(1, 99), ...len(8, [1, 0])])).dtype, 99);
});

test('truncated or malformed messages are refused, never read past their end', () => {
  const whole = [...int(1, 3), ...len(2, [0x61]), ...len(3, [...int(1, 1), ...packed(3, Float32Array, [1, 2])])];
  for (let cut = 1; cut < whole.length; cut += 1) {
    const bytes = Uint8Array.from(whole.slice(0, cut));
    let reply = null;
    try {
      reply = getTensorResponse(bytes);
    } catch (error) {
      assert.match(error.message, /truncated|whole number|field number 0|wire type/);
      continue;
    }
    // A cut between two fields leaves a shorter valid message.
    assert.ok(reply.tensor === null || reply.tensor.values.length <= 2, `cut ${cut}`);
  }
  assert.throws(() => tensor(Uint8Array.from([...key(1, 0), ...Array(10).fill(0x80), 1])), /10 bytes/);
  assert.throws(() => tensor(Uint8Array.from([0, 1])), /field number 0/);
  assert.throws(() => tensor(Uint8Array.from([...key(1, 6)])), /wire type 6/);
  assert.throws(() => tensor(Uint8Array.from(packed(3, Uint8Array, [1, 2, 3]))), /whole number/);
});
