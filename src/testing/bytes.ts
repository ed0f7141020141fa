/**
 * A tiny little-endian byte builder for tests: fixtures are built with it,
 * never with the encoder under test. Part of the public test utilities.
 */

/** Appends little-endian integers and raw bytes, one byte at a time. */
export class Bytes {
  readonly #out: number[] = [];

  u8(v: number): this {
    this.#out.push(v & 0xff);
    return this;
  }

  u16(v: number): this {
    return this.u8(v).u8(v >>> 8);
  }

  u32(v: number): this {
    return this.u8(v).u8(v >>> 8).u8(v >>> 16).u8(v >>> 24);
  }

  u64(v: number | bigint): this {
    let b = BigInt(v);
    for (let i = 0; i < 8; i++) {
      this.u8(Number(b & 0xffn));
      b >>= 8n;
    }
    return this;
  }

  bytes(b: ArrayLike<number>): this {
    for (let i = 0; i < b.length; i++) this.u8(b[i]!);
    return this;
  }

  zeros(n: number): this {
    for (let i = 0; i < n; i++) this.u8(0);
    return this;
  }

  /** ASCII text (the fixtures use ASCII JSON only). */
  ascii(s: string): this {
    for (let i = 0; i < s.length; i++) this.u8(s.charCodeAt(i));
    return this;
  }

  get length(): number {
    return this.#out.length;
  }

  build(): Buffer {
    return Buffer.from(this.#out);
  }
}
