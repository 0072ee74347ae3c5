//! A stage's mailbox as the stages before it hold it. The supervisor wires
//! each stage with the mailboxes of the stages after it when it starts the
//! stage, and points a mailbox at the new actor when it revives one, so no
//! stage looks its next stage up.

use actix::dev::ToEnvelope;
use actix::{Actor, Addr, Handler, MailboxError, Message};
use std::sync::{Arc, RwLock};

pub struct Mailbox<A: Actor>(Arc<RwLock<Option<Addr<A>>>>);

impl<A: Actor> Clone for Mailbox<A> {
    fn clone(&self) -> Self {
        Mailbox(self.0.clone())
    }
}

impl<A: Actor> Default for Mailbox<A> {
    fn default() -> Self {
        Mailbox(Arc::default())
    }
}

impl<A: Actor> Mailbox<A> {
    /// The actor's address now; None before it first started.
    pub fn addr(&self) -> Option<Addr<A>> {
        self.0.read().expect("mailbox lock").clone()
    }

    /// The address of a stage that has started. Stages start after the
    /// stages they send to, so a mailbox a stage holds is always wired; one
    /// that is not is a wiring bug, not a message to drop.
    fn wired(&self) -> Addr<A> {
        self.addr().expect("a stage's mailbox is wired before any stage sends to it")
    }

    /// Sends without waiting.
    pub fn do_send<M>(&self, message: M)
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        self.wired().do_send(message);
    }

    /// Sends and waits for the answer (backpressure from a slow stage).
    pub async fn send<M>(&self, message: M) -> Result<M::Result, MailboxError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        self.wired().send(message).await
    }

    /// Points the mailbox at a (re)started actor.
    pub(super) fn point_to(&self, addr: Addr<A>) {
        *self.0.write().expect("mailbox lock") = Some(addr);
    }
}
