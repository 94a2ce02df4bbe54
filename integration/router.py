#!/usr/bin/python3
"""A router (interface engine) for the integration tests, built on the
asyncio MLLP server of Debian's python3-hl7: a foreign MLLP peer that
hl7mail delivers to.

Usage: router.py PORT OUTDIR [CODES]

Every message received is written to OUTDIR as it arrived, one file each
(000001.hl7, ...), and answered with the acknowledgement that python-hl7's
create_ack makes: MSA-1 AA, or, with CODES (e.g. CE,CE,AA,AE), the next of
those codes for each message until they run out. ACK messages are answers
themselves and get none. Prints "listening" once the port is open.
"""
import asyncio
import os
import sys

import hl7
from hl7.mllp import start_hl7_server


async def main(port, outdir, codes):
    count = 0

    async def handle(reader, writer):
        nonlocal count
        try:
            while not writer.is_closing():
                block = await reader.readblock()
                count += 1
                path = os.path.join(outdir, "%06d.hl7" % count)
                with open(path + ".tmp", "wb") as f:
                    f.write(block)
                os.rename(path + ".tmp", path)
                msg = hl7.parse(block.decode("utf-8"))
                if str(msg.segment("MSH")(9)(1)(1)) == "ACK":
                    continue
                code = codes.pop(0) if codes else "AA"
                writer.writeblock(str(msg.create_ack(code)).encode("utf-8"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await start_hl7_server(handle, "127.0.0.1", port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    codes = sys.argv[3].split(",") if len(sys.argv) > 3 else []
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], codes))
