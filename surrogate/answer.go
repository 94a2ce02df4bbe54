package surrogate

import (
	"log/slog"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/mllp"
)

// handleBatch stores an HL7 batch (HL7 v2.5 §2.10.3) as one message, sent
// as one MIME-EDI entity, and answers it as the partner's batch_ack says:
// one ACK for the batch (MSA-2 the batch control ID), or a batch
// acknowledgement with one ACK per message. A batch that is not well formed
// is refused whole (CR). A batch is answered at once, also with ack_mode
// rendezvous: its answers come back as one batch.
func (c *conn) handleBatch(frame []byte) {
	b, err := hl7.ParseBatch(frame)
	if err != nil {
		c.log.Warn("batch rejected", "reason", err.Error(), "size", len(frame))
		c.answer(nil, hl7.CommitReject, err.Error(), hl7.ErrSegmentSequence)
		return
	}
	log := c.log.With("control_id", b.Header.ControlID)
	res, err := c.spool(b.Header.ControlID, hl7.BatchType, frame)
	code := hl7.CommitAccept
	if err != nil {
		log.Error("batch not stored; answering CE", "err", err)
		code = hl7.CommitError
	} else {
		log.Info("batch accepted", "id", res.ID, "messages", len(b.Messages), "size", len(frame))
	}
	if !c.s.opts.BatchAckEach {
		text := ""
		if code == hl7.CommitError {
			text = notStored
		}
		c.answer(b.Header, code, text, "")
		return
	}
	var acks [][]byte
	for _, h := range b.Headers {
		mc := code
		if c.s.opts.OriginalModeAA {
			mc = h.AcceptCode(code)
		}
		if h.AckWanted(mc) {
			acks = append(acks, hl7.BuildAck(h, hl7.Ack{Code: mc, ControlID: c.s.opts.IDs.Next()}))
		}
	}
	if err := c.write(hl7.BuildBatchAck(b, c.s.opts.IDs.Next(), acks, time.Time{})); err != nil {
		log.Warn("batch acknowledgement not written", "err", err)
		return
	}
	c.observe(code)
}

// rendezvous waits for the partner's response to message id and writes it
// on the router's connection, or answers that it timed out.
func (c *conn) rendezvous(log *slog.Logger, h *hl7.Header, id int64) {
	resp, written, err := c.s.opts.Rendezvous(c.s.srv.Context(), id)
	if err != nil {
		log.Warn("no response from the partner in time; the message is stored and will be delivered", "id", id, "err", err)
		c.answer(h, hl7.CommitError, "timed out waiting for the partner's response; the message is stored and will be delivered",
			hl7.ErrApplicationIntern)
		return
	}
	err = c.write(resp)
	if written != nil {
		written(err)
	}
	if err != nil {
		log.Warn("the partner's response not written; it will be delivered as a message of its own", "id", id, "err", err)
		return
	}
	code := ""
	if a, err := hl7.ParseAck(resp); err == nil {
		code = string(a.Code)
	}
	log.Info("the partner's response answered the router (rendezvous)", "id", id, "ack", code)
	c.observe(hl7.AckCode(code))
}

// answer writes the accept ACK with code to the router, if MSH-15 asks for it.
func (c *conn) answer(h *hl7.Header, code hl7.AckCode, text, errCode string) {
	if h != nil {
		if c.s.opts.OriginalModeAA {
			code = h.AcceptCode(code)
		}
		if !h.AckWanted(code) {
			return
		}
	}
	ack := hl7.BuildAck(h, hl7.Ack{Code: code, ControlID: c.s.opts.IDs.Next(), Text: text, ErrorCode: errCode})
	if err := c.write(ack); err != nil {
		c.log.Warn("ACK not written", "code", string(code), "err", err)
		return
	}
	c.observe(code)
}

// write writes frame to the router within WriteTimeout.
func (c *conn) write(frame []byte) error {
	c.nc.SetWriteDeadline(time.Now().Add(c.s.opts.WriteTimeout))
	return mllp.WriteFrame(c.nc, frame)
}

// observe reports an answer with code written to the router, timed from the
// end of the frame it answers (metrics).
func (c *conn) observe(code hl7.AckCode) {
	if c.s.opts.Observe != nil && code != "" {
		c.s.opts.Observe(code, time.Since(c.read))
	}
}
