#!/usr/bin/python3
"""A router (interface engine) for the integration tests, built on the
asyncio MLLP server of Debian's python3-hl7: a foreign MLLP peer that
hl7mail delivers to.

Usage: router.py PORT OUTDIR [CODES]

Every message received is written to OUTDIR as it arrived, one file each
(000001.hl7, ...), and answered with the acknowledgement that python-hl7's
create_ack makes: MSA-1 AA, or, with CODES (e.g. CE,CE,AA,AE), the next of
those codes for each message until they run out. ACK messages are answers
themselves and get none. A batch (BHS ... BTS, in an FHS ... FTS file or
not) is answered with a batch acknowledgement: a BHS naming the batch in
BHS-12, create_ack's answer to each of its messages, and a BTS with their
count; a batch of acknowledgements gets none. Prints "listening" once the
port is open.

With ROUTER_TLS_CERT and ROUTER_TLS_KEY set it speaks MLLP over TLS, and
with ROUTER_TLS_CA it requires a client certificate signed by that CA.
"""
import asyncio
import os
import ssl
import sys

import hl7
from hl7.mllp import start_hl7_server


def batch_ack(batch, codes, n):
    """The batch acknowledgement of batch (HL7 v2.5 section 2.10.3.2)."""
    bhs = str(batch.header).split("|") if batch.header else []
    ref = bhs[10] if len(bhs) > 10 else ""
    acks = [str(m.create_ack(codes.pop(0) if codes else "AA")) for m in batch]
    return "\r".join(["BHS|^~\\&|ROUTER||||||||RB%d|%s" % (n, ref)] + acks + ["BTS|%d" % len(acks)]) + "\r"


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
                parsed = hl7.parse_hl7(block.decode("utf-8"))
                if isinstance(parsed, hl7.File):
                    parsed = parsed[0]
                if isinstance(parsed, hl7.Batch):
                    if all(str(m.segment("MSH")(9)(1)(1)) == "ACK" for m in parsed):
                        continue  # a batch acknowledgement is an answer itself
                    writer.writeblock(batch_ack(parsed, codes, count).encode("utf-8"))
                    await writer.drain()
                    continue
                msg = parsed
                if str(msg.segment("MSH")(9)(1)(1)) == "ACK":
                    continue
                code = codes.pop(0) if codes else "AA"
                writer.writeblock(str(msg.create_ack(code)).encode("utf-8"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    kwds = {}
    if os.environ.get("ROUTER_TLS_CERT"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(os.environ["ROUTER_TLS_CERT"], os.environ["ROUTER_TLS_KEY"])
        if os.environ.get("ROUTER_TLS_CA"):
            ctx.load_verify_locations(os.environ["ROUTER_TLS_CA"])
            ctx.verify_mode = ssl.CERT_REQUIRED
        kwds["ssl"] = ctx
    server = await start_hl7_server(handle, "127.0.0.1", port, **kwds)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    codes = sys.argv[3].split(",") if len(sys.argv) > 3 else []
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], codes))
