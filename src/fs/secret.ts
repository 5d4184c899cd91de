/**
 * Reading a secret (a password, a credentials file) that someone put on disk for k8s4r: it must
 * be a regular file that only its owner may read or write (0600 or 0400), and that owner must
 * be this user or root (another user could put a password of their choosing there, or read it
 * back). Errors name the file, what is wrong and the command that fixes it; the secret itself
 * is never in them.
 */
export async function readSecretFile(path: string, what: string): Promise<string> {
  let st: Deno.FileInfo;
  try {
    st = await Deno.stat(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) throw new Error(`${path}: ${what} not found`);
    throw new Error(`${path}: cannot read the ${what}: ${(err as Error).message}`);
  }
  if (!st.isFile) throw new Error(`${path}: ${what} is not a regular file`);
  if (st.mode !== null && (st.mode & 0o077) !== 0) {
    throw new Error(
      `${path}: ${what} is readable by group or others (mode ${
        (st.mode & 0o777).toString(8).padStart(3, "0")
      }, expected 600); run chmod 600 ${path}`,
    );
  }
  const uid = Deno.uid();
  if (uid !== null && st.uid !== null && st.uid !== uid && st.uid !== 0) {
    throw new Error(
      `${path}: ${what} belongs to uid ${st.uid}, not to this user (uid ${uid}) or root; run chown ${uid} ${path} (if its content is yours)`,
    );
  }
  return await Deno.readTextFile(path);
}
