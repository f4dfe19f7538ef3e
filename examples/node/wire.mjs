// GetTensor's values viewed in place: a typed array over the reply's own bytes, with no loop
// over the values.
//
// trainer.proto's typed fields are packed and fixed-width, so on the wire each one is the
// little-endian array itself. @grpc/proto-loader (protobufjs) decodes such a field value by
// value into a JavaScript Array; for a tensor of 16 MiB that takes several times as long as
// the transfer (docs/PERFORMANCE.md, "A client in another language"). `getTensorResponse`
// below finds the field and views it instead: a Float32Array for float32, and so on.
//
//   import { withTensorViews } from './wire.mjs';
//   const Fast = withTensorViews(Trainer);    // Trainer from grpc.loadPackageDefinition
//   const trainer = new Fast(target, credentials, { 'grpc.max_receive_message_length': -1 });
//   trainer.GetTensor({ name: 'conv1.weight' }, (error, reply) => reply.tensor.values);

import os from 'node:os';

import grpc from '@grpc/grpc-js';

// Tensor's fields (trainer.proto): the typed array each values field is read as, by dtype.
const VALUES = {
  3: { dtype: 'DTYPE_FLOAT32', Array: Float32Array },
  4: { dtype: 'DTYPE_FLOAT64', Array: Float64Array },
  5: { dtype: 'DTYPE_INT32', Array: Int32Array },
  6: { dtype: 'DTYPE_INT64', Array: BigInt64Array },
  7: { dtype: 'DTYPE_BOOL', Array: Uint8Array }, // 0 or 1: read varint by varint, see bools
  8: { dtype: null, Array: Uint16Array }, // float16 or bfloat16: the 16-bit words, undecoded
};
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
// Wire types: 0 varint, 1 eight bytes, 2 length-delimited, 5 four bytes.
const FIXED = { 1: 8, 5: 4 };

class Reader {
  constructor(bytes, start = 0, end = bytes.length) {
    Object.assign(this, { bytes, pos: start, end });
  }

  more() {
    return this.pos < this.end;
  }

  varint() {
    let value = 0;
    let scale = 1;
    for (;;) {
      if (this.pos >= this.end) throw new Error('truncated message');
      const byte = this.bytes[this.pos++];
      value += (byte & 0x7f) * scale;
      if (byte < 0x80) return value; // exact up to 2^53: versions, shapes and offsets are
      scale *= 128;
    }
  }

  /** The next field: its number, wire type, and where its value's bytes are (for a
   *  length-delimited field, after the length). */
  field() {
    const key = this.varint();
    const number = Math.floor(key / 8);
    const type = key & 7;
    let start = this.pos;
    if (type === 0) {
      this.varint();
    } else if (type === 2) {
      const length = this.varint();
      start = this.pos;
      this.pos += length;
    } else if (type in FIXED) {
      this.pos += FIXED[type];
    } else {
      throw new Error(`wire type ${type} is not in trainer.proto`);
    }
    if (this.pos > this.end) throw new Error('truncated message');
    return { number, type, start, end: this.pos };
  }
}

/** repeated int64 (a shape): packed, or one varint per entry; both are valid protobuf. */
function addInts(list, bytes, field) {
  if (field.type === 0) {
    list.push(new Reader(bytes, field.start, field.end).varint());
    return;
  }
  const reader = new Reader(bytes, field.start, field.end);
  while (reader.more()) list.push(reader.varint());
}

/** A typed array of `Array` over bytes[start, end): a view when aligned, else one copy. */
function view(Array, bytes, pieces) {
  const size = Array.BYTES_PER_ELEMENT;
  if (pieces.length === 1) {
    const [start, end] = pieces[0];
    const offset = bytes.byteOffset + start;
    if ((end - start) % size !== 0) throw new Error('values field is not a whole number of values');
    if (offset % size === 0) return new Array(bytes.buffer, offset, (end - start) / size);
  }
  // Unaligned (as it is when the fields before it take a number of bytes that is not a
  // multiple of the value's size), or sent in several pieces (as protobuf allows): one copy,
  // into memory that is not zeroed first, since every byte is written.
  const total = pieces.reduce((sum, [start, end]) => sum + end - start, 0);
  if (total % size !== 0) throw new Error('values field is not a whole number of values');
  const out = Buffer.allocUnsafeSlow(total);
  let at = 0;
  for (const [start, end] of pieces) at += bytes.copy(out, at, start, end);
  return new Array(out.buffer, out.byteOffset, total / size);
}

/** Packed bools: one varint each, so any nonzero varint is true (not only the byte 1). */
function bools(bytes, pieces) {
  const out = [];
  for (const [start, end] of pieces) {
    const reader = new Reader(bytes, start, end);
    while (reader.more()) out.push(reader.varint() === 0 ? 0 : 1);
  }
  return Uint8Array.from(out);
}

/** A Tensor message's bytes as { dtype, shape, values: a typed array }. */
export function tensor(bytes, start = 0, end = bytes.length) {
  let dtype = 'DTYPE_UNSPECIFIED';
  const shape = [];
  const pieces = {};
  const reader = new Reader(bytes, start, end);
  while (reader.more()) {
    const field = reader.field();
    if (field.number === 1) dtype = DTYPES[new Reader(bytes, field.start, field.end).varint()];
    else if (field.number === 2) addInts(shape, bytes, field);
    else if (field.number in VALUES) (pieces[field.number] ??= []).push([field.start, field.end]);
  }
  const [number] = Object.keys(pieces);
  if (number === undefined) {
    // Empty: zero values (a tensor with a 0 in its shape), in the field its dtype names.
    const entry = Object.values(VALUES).find((v) => v.dtype === dtype) ?? VALUES[8];
    return { dtype, shape, values: new entry.Array(0) };
  }
  const values =
    number === '7' ? bools(bytes, pieces[7]) : view(VALUES[number].Array, bytes, pieces[number]);
  return { dtype, shape, values };
}

/** A GetTensorResponse's bytes, its values viewed in place; tensor null when absent. */
export function getTensorResponse(bytes) {
  if (os.endianness() !== 'LE') throw new Error('typed views need a little-endian host');
  const reply = { version: 0, name: '', tensor: null, full_shape: [] };
  const reader = new Reader(bytes);
  while (reader.more()) {
    const field = reader.field();
    if (field.number === 1) reply.version = new Reader(bytes, field.start, field.end).varint();
    else if (field.number === 2) reply.name = bytes.toString('utf8', field.start, field.end);
    else if (field.number === 3) reply.tensor = tensor(bytes, field.start, field.end);
    else if (field.number === 4) addInts(reply.full_shape, bytes, field);
  }
  return reply;
}

/** A Trainer client class whose GetTensor replies carry typed arrays, viewed in place. */
export function withTensorViews(Trainer) {
  const service = { ...Trainer.service };
  service.GetTensor = { ...service.GetTensor, responseDeserialize: getTensorResponse };
  return grpc.makeGenericClientConstructor(service, 'Trainer');
}
