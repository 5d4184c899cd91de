/**
 * Runs async jobs one at a time, in call order (a mutex without timeouts). A job that throws
 * does not stop the ones after it.
 */
export class Turns {
  #tail: Promise<unknown> = Promise.resolve();

  run<T>(job: () => Promise<T>): Promise<T> {
    const r = this.#tail.then(job);
    this.#tail = r.catch(() => {});
    return r;
  }
}
