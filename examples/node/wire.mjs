// GetTensor's values as a typed array over the reply's own bytes, with no loop over the values.
//
// trainer.proto's typed fields are packed and fixed-width, so on the wire each one is the
// little-endian array itself. @grpc/proto-loader (protobufjs) decodes such a field value by
// value into a JavaScript Array; for a tensor of 16 MiB that takes about four times as long as
// the transfer (docs/performance-history.md, "The twelfth session"). `getTensorResponse`
// below finds the field and makes it a Float32Array (and so on): a view of the reply's bytes
// when they are aligned for the type, otherwise one copy.
//
//   import { withTensorViews } from './wire.mjs';
//   const Fast = withTensorViews(Trainer);    // Trainer from grpc.loadPackageDefinition
//   const trainer = new Fast(target, credentials, CHANNEL_OPTIONS);
//   trainer.GetTensor({ name: 'conv1.weight' }, (error, reply) => reply.tensor.values);
//
// The reply's other fields come as proto-loader gives them, except that the int64 `version`,
// `shape` and `full_shape` are Numbers (exact below 2^53, which they stay under), not strings.

import grpc from '@grpc/grpc-js';

// Wire types.
const VARINT = 0;
const I64 = 1;
const LEN = 2;
const START_GROUP = 3;
const END_GROUP = 4;
const I32 = 5;

const DTYPES = [
  'DTYPE_UNSPECIFIED',
  'DTYPE_FLOAT32',
  'DTYPE_FLOAT64',
  'DTYPE_FLOAT16',
  'DTYPE_BFLOAT16',
  'DTYPE_INT32',
  'DTYPE_INT64',
  'DTYPE_BOOL',
];
// Tensor's values fields (trainer.proto): the typed array each is read as, and the wire type
// of one value when a sender does not pack them (a parser must accept both forms).
const VALUES = {
  3: { Array: Float32Array, unpacked: I32 }, // float_values
  4: { Array: Float64Array, unpacked: I64 }, // double_values
  5: { Array: Int32Array, unpacked: I32 }, // int32_values (sfixed32)
  6: { Array: BigInt64Array, unpacked: I64 }, // int64_values (sfixed64)
  7: { Array: Uint8Array, unpacked: VARINT }, // bool_values: 0 or 1, read varint by varint
  8: { Array: Uint16Array, unpacked: null }, // raw_values (bytes): float16 or bfloat16 words
};
const FIELD_OF = {
  DTYPE_FLOAT32: 3,
  DTYPE_FLOAT64: 4,
  DTYPE_INT32: 5,
  DTYPE_INT64: 6,
  DTYPE_BOOL: 7,
  DTYPE_FLOAT16: 8,
  DTYPE_BFLOAT16: 8,
};
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const utf8 = new TextDecoder();

class Reader {
  constructor(bytes, start = 0, end = bytes.length) {
    Object.assign(this, { bytes, pos: start, end });
  }

  more() {
    return this.pos < this.end;
  }

  /** A varint as a Number: exact below 2^53 (versions, shapes, lengths, dtypes). */
  varint() {
    let value = 0;
    let scale = 1;
    for (let i = 0; i < 10; i += 1) {
      if (this.pos >= this.end) throw new Error('truncated message');
      const byte = this.bytes[this.pos++];
      value += (byte & 0x7f) * scale;
      if (byte < 0x80) return value;
      scale *= 128;
    }
    throw new Error('varint longer than 10 bytes');
  }

  /** The next field: its number, wire type, and its value's bytes [start, end), after the
   *  length of a length-delimited field. A group (a deprecated form no field of
   *  trainer.proto has) is skipped whole. */
  field() {
    const key = this.varint();
    const number = Math.floor(key / 8);
    const type = key % 8;
    if (number === 0) throw new Error('field number 0');
    let start = this.pos;
    if (type === LEN) {
      const length = this.varint();
      start = this.pos;
      this.pos += length;
    } else {
      this.skip(type, number);
    }
    if (this.pos > this.end) throw new Error('truncated message');
    return { number, type, start, end: this.pos };
  }

  skip(type, number) {
    if (type === VARINT) this.varint();
    else if (type === I64) this.pos += 8;
    else if (type === I32) this.pos += 4;
    else if (type === START_GROUP) {
      for (;;) {
        if (!this.more()) throw new Error('truncated message');
        const at = this.pos;
        const inner = this.varint();
        if (inner % 8 === END_GROUP) {
          if (Math.floor(inner / 8) !== number) throw new Error('group ends with another number');
          return;
        }
        this.pos = at;
        this.field(); // any field inside, nested groups too, read as at the top
      }
    } else throw new Error(`wire type ${type} where a field starts`);
  }
}

/** A varint field's value, or undefined when the field came with another wire type (then it
 *  is not this field as trainer.proto declares it, and is skipped as unknown). */
function varintOf(bytes, field) {
  return field.type === VARINT ? new Reader(bytes, field.start, field.end).varint() : undefined;
}

/** repeated int64 (a shape): packed, or one varint per entry; both are valid protobuf. */
function addInts(list, bytes, field) {
  if (field.type === VARINT) list.push(varintOf(bytes, field));
  else if (field.type === LEN) {
    const reader = new Reader(bytes, field.start, field.end);
    while (reader.more()) list.push(reader.varint());
  }
}

/** The values as an `Array` (a typed array class) over bytes[start, end) when there is one
 *  piece aligned for the type; otherwise one copy of the pieces, in order. */
function typed(Array, bytes, pieces) {
  const size = Array.BYTES_PER_ELEMENT;
  const total = pieces.reduce((sum, [start, end]) => sum + end - start, 0);
  if (total % size !== 0) throw new Error('values field is not a whole number of values');
  if (pieces.length === 1 && (bytes.byteOffset + pieces[0][0]) % size === 0) {
    return new Array(bytes.buffer, bytes.byteOffset + pieces[0][0], total / size);
  }
  // Every byte is written: in Node, memory that is not zeroed first.
  const out = typeof Buffer === 'undefined' ? new Uint8Array(total) : Buffer.allocUnsafeSlow(total);
  let at = 0;
  for (const [start, end] of pieces) {
    out.set(bytes.subarray(start, end), at);
    at += end - start;
  }
  return new Array(out.buffer, out.byteOffset, total / size);
}

/** Packed or unpacked bools: one varint each, so any nonzero varint is true. */
function bools(bytes, pieces) {
  const out = [];
  for (const [start, end] of pieces) {
    const reader = new Reader(bytes, start, end);
    while (reader.more()) out.push(reader.varint() === 0 ? 0 : 1);
  }
  return Uint8Array.from(out);
}

/** A Tensor message's bytes as { dtype, shape, values: a typed array }. The dtype is its name
 *  in trainer.proto, or its number when this file does not know it. */
export function tensor(bytes, start = 0, end = bytes.length) {
  if (!LITTLE_ENDIAN) throw new Error('typed views need a little-endian host');
  let dtype = 0;
  const shape = [];
  const pieces = {};
  const reader = new Reader(bytes, start, end);
  while (reader.more()) {
    const field = reader.field();
    const values = VALUES[field.number];
    if (field.number === 1) dtype = varintOf(bytes, field) ?? dtype;
    else if (field.number === 2) addInts(shape, bytes, field);
    else if (field.number === 8 && field.type === LEN) pieces[8] = [[field.start, field.end]]; // bytes: the last wins
    else if (values && field.number !== 8 && (field.type === LEN || field.type === values.unpacked)) {
      (pieces[field.number] ??= []).push([field.start, field.end]);
    }
  }
  const name = DTYPES[dtype] ?? dtype;
  const present = Object.keys(pieces).map(Number);
  if (present.length > 1) throw new Error(`a tensor sets more than one values field: ${present}`);
  const number = FIELD_OF[name] ?? present[0];
  if (present.length === 1 && present[0] !== number) {
    throw new Error(`${name} travels in field ${number}, but field ${present[0]} is set`);
  }
  if (number === undefined) return { dtype: name, shape, values: new Uint8Array(0) };
  const parts = pieces[number] ?? [];
  const values = number === 7 ? bools(bytes, parts) : typed(VALUES[number].Array, bytes, parts);
  return { dtype: name, shape, values };
}

/** The bytes of every occurrence of a message field, as one message: protobuf merges a
 *  message field sent more than once, which parsing them one after the other does. */
function merged(bytes, ranges) {
  if (ranges.length === 1) return [bytes, ...ranges[0]];
  const parts = ranges.map(([start, end]) => bytes.subarray(start, end));
  const joined = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  parts.reduce((at, part) => (joined.set(part, at), at + part.length), 0);
  return [joined, 0, joined.length];
}

/** A GetTensorResponse's bytes, its values a typed array; tensor null when absent. */
export function getTensorResponse(bytes) {
  const reply = { version: 0, name: '', tensor: null, full_shape: [] };
  const tensors = [];
  const reader = new Reader(bytes);
  while (reader.more()) {
    const field = reader.field();
    if (field.number === 1) reply.version = varintOf(bytes, field) ?? reply.version;
    else if (field.number === 2 && field.type === LEN) {
      reply.name = utf8.decode(bytes.subarray(field.start, field.end));
    } else if (field.number === 3 && field.type === LEN) tensors.push([field.start, field.end]);
    else if (field.number === 4) addInts(reply.full_shape, bytes, field);
  }
  if (tensors.length) reply.tensor = tensor(...merged(bytes, tensors));
  return reply;
}

/** A Trainer client class whose GetTensor replies carry typed arrays (see above). */
export function withTensorViews(Trainer) {
  const service = { ...Trainer.service };
  service.GetTensor = { ...service.GetTensor, responseDeserialize: getTensorResponse };
  return grpc.makeGenericClientConstructor(service, 'Trainer');
}
