/** A device spec served on a socket in a test, with our client connected to it; all closed after the test. */
import type { TestContext } from 'node:test';
import { VfioUserServer } from '../../src/vfio-user/server.js';
import { VfioUserClient } from '../../src/vfio-user/client.js';
import { VfioUserDevice } from '../../src/vfio-user/client-device.js';
import type { VfioUserDeviceSpec } from '../../src/vfio-user/device.js';
import { tick } from './sys.js';

export interface Served<S extends VfioUserDeviceSpec> {
  spec: S;
  server: VfioUserServer;
  client: VfioUserClient;
  dev: VfioUserDevice;
}

/** Serves `spec` at `socket`, connects a client; after the test: device, client, server, then `spec.close()` if it has one. */
export async function serveSpec<S extends VfioUserDeviceSpec & { close?(): void }>(t: TestContext, socket: string, spec: S): Promise<Served<S>> {
  const server = VfioUserServer.listen(socket, { device: spec });
  const client = await VfioUserClient.connect(server.path);
  const dev = new VfioUserDevice(client);
  t.after(async () => {
    dev.close();
    client.close();
    server.close();
    await tick(5);
    spec.close?.();
  });
  return { spec, server, client, dev };
}
