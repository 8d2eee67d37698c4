//! In-process backend: `InProcessQueue`, queues in memory behind one mutex, with the delivery
//! semantics of the RabbitMQ topology (redelivery, delivery limit, dead-lettering, prefetch).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::Notify;
use tracing::debug;

use crate::config::{validate_name, QueueConfig, TopologyNames};
use crate::consumer::{Consumer, ConsumerInner};
use crate::error::QueueError;
use crate::message::{
    Acker, AckerInner, DeadLetter, DeadLetterReason, Delivery, OutgoingMessage, Settlement,
};
use crate::TaskQueue;

/// A task queue inside one process (local mode, tests). Cheap to clone: clones share the queues.
/// Publisher confirms are trivially positive; there is no consumer timeout and nothing survives
/// the process.
#[derive(Clone, Debug)]
pub struct InProcessQueue {
    config: QueueConfig,
    names: TopologyNames,
    broker: Arc<Mutex<Broker>>,
}

#[derive(Debug, Default)]
struct Broker {
    queues: HashMap<String, MemoryQueue>,
    /// Families bound to the tasks exchange (declared).
    task_routes: HashSet<String>,
    exchanges_declared: bool,
    control_subscribers: BTreeSet<String>,
    next_id: u64,
}

#[derive(Debug)]
struct MemoryQueue {
    /// Messages given back by consumers; served before `ready`, like RabbitMQ's returns.
    returned: VecDeque<StoredMessage>,
    ready: VecDeque<StoredMessage>,
    /// Delivery tag -> (consumer id, message).
    unacked: HashMap<u64, (u64, StoredMessage)>,
    consumers: HashMap<u64, ConsumerSlot>,
    next_tag: u64,
    delivery_limit: Option<u64>,
    dead_letter_queue: Option<String>,
    /// Exclusive auto-delete: deleted when its last consumer goes.
    auto_delete: bool,
    notify: Arc<Notify>,
}

#[derive(Debug)]
struct ConsumerSlot {
    prefetch: u16,
    in_flight: usize,
}

#[derive(Clone, Debug)]
struct StoredMessage {
    message: OutgoingMessage,
    redelivered: bool,
    delivery_count: u64,
    dead_letter: Option<DeadLetter>,
}

impl StoredMessage {
    fn new(message: OutgoingMessage) -> Self {
        Self {
            message,
            redelivered: false,
            delivery_count: 0,
            dead_letter: None,
        }
    }
}

impl MemoryQueue {
    fn new(
        delivery_limit: Option<u64>,
        dead_letter_queue: Option<String>,
        auto_delete: bool,
    ) -> Self {
        Self {
            returned: VecDeque::new(),
            ready: VecDeque::new(),
            unacked: HashMap::new(),
            consumers: HashMap::new(),
            next_tag: 0,
            delivery_limit,
            dead_letter_queue,
            auto_delete,
            notify: Arc::new(Notify::new()),
        }
    }
}

enum Take {
    Delivery(u64, StoredMessage),
    Wait(Arc<Notify>),
    Cancelled,
}

impl Broker {
    fn enqueue(&mut self, queue: &str, message: StoredMessage) -> bool {
        let Some(target) = self.queues.get_mut(queue) else {
            return false;
        };
        target.ready.push_back(message);
        target.notify.notify_waiters();
        true
    }

    fn take(&mut self, queue: &str, consumer_id: u64) -> Take {
        let Some(source) = self.queues.get_mut(queue) else {
            return Take::Cancelled;
        };
        let Some(slot) = source.consumers.get_mut(&consumer_id) else {
            return Take::Cancelled;
        };
        if slot.prefetch != 0 && slot.in_flight >= usize::from(slot.prefetch) {
            return Take::Wait(source.notify.clone());
        }
        let Some(message) = source
            .returned
            .pop_front()
            .or_else(|| source.ready.pop_front())
        else {
            return Take::Wait(source.notify.clone());
        };
        slot.in_flight += 1;
        source.next_tag += 1;
        let tag = source.next_tag;
        source.unacked.insert(tag, (consumer_id, message.clone()));
        Take::Delivery(tag, message)
    }

    /// Gives a message back to its queue (nack with requeue, consumer gone), or dead-letters it
    /// once it was returned more than the delivery limit.
    fn return_message(&mut self, queue: &str, mut message: StoredMessage) {
        message.delivery_count += 1;
        message.redelivered = true;
        let Some(source) = self.queues.get_mut(queue) else {
            return;
        };
        if source
            .delivery_limit
            .is_some_and(|limit| message.delivery_count > limit)
        {
            self.dead_letter(queue, message, DeadLetterReason::DeliveryLimit);
            return;
        }
        source.returned.push_back(message);
        source.notify.notify_waiters();
    }

    fn dead_letter(&mut self, queue: &str, message: StoredMessage, reason: DeadLetterReason) {
        let Some(target) = self
            .queues
            .get(queue)
            .and_then(|source| source.dead_letter_queue.clone())
        else {
            debug!(queue, message_id = %message.message.message_id, "message dropped: its queue has no dead-letter queue");
            return;
        };
        let count = match &message.dead_letter {
            Some(previous) if previous.queue == queue && previous.reason == reason => {
                previous.count + 1
            }
            _ => 1,
        };
        let dead = StoredMessage {
            dead_letter: Some(DeadLetter {
                reason,
                queue: queue.to_string(),
                count,
            }),
            redelivered: false,
            delivery_count: 0,
            message: message.message,
        };
        if !self.enqueue(&target, dead) {
            debug!(queue, dead_letter_queue = %target, "message dropped: dead-letter queue missing");
        }
    }

    fn remove_consumer(&mut self, queue: &str, consumer_id: u64) {
        let Some(source) = self.queues.get_mut(queue) else {
            return;
        };
        source.consumers.remove(&consumer_id);
        let mut held: Vec<(u64, StoredMessage)> = Vec::new();
        source.unacked.retain(|tag, (owner, message)| {
            if *owner == consumer_id {
                held.push((*tag, message.clone()));
                false
            } else {
                true
            }
        });
        held.sort_by_key(|(tag, _)| *tag);
        let delete = source.auto_delete && source.consumers.is_empty();
        let notify = source.notify.clone();
        for (_, message) in held {
            self.return_message(queue, message);
        }
        if delete {
            self.queues.remove(queue);
            self.control_subscribers.remove(queue);
        }
        notify.notify_waiters();
    }

    fn delete_queue(&mut self, queue: &str) {
        if let Some(removed) = self.queues.remove(queue) {
            removed.notify.notify_waiters();
        }
        self.control_subscribers.remove(queue);
    }

    fn settle(
        &mut self,
        queue: &str,
        consumer_id: u64,
        tag: u64,
        settlement: Settlement,
    ) -> Result<(), QueueError> {
        let closed = QueueError::Closed {
            operation: "settle",
        };
        let Some(source) = self.queues.get_mut(queue) else {
            return Err(closed);
        };
        match source.unacked.get(&tag) {
            Some((owner, _)) if *owner == consumer_id => {}
            _ => return Err(closed),
        }
        let Some((_, message)) = source.unacked.remove(&tag) else {
            return Err(closed);
        };
        if let Some(slot) = source.consumers.get_mut(&consumer_id) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
        }
        source.notify.notify_waiters();
        match settlement {
            Settlement::Ack => {}
            Settlement::Nack { requeue: true } => self.return_message(queue, message),
            Settlement::Nack { requeue: false } | Settlement::Reject => {
                self.dead_letter(queue, message, DeadLetterReason::Rejected)
            }
        }
        Ok(())
    }
}

fn unroutable(destination: String) -> QueueError {
    QueueError::Publish {
        destination,
        reason: "unroutable: 312 NO_ROUTE".to_string(),
    }
}

impl InProcessQueue {
    /// An empty broker; `config.namespace` names the queues, `config.delivery_limit` applies.
    pub fn new(config: QueueConfig) -> Self {
        Self {
            names: config.names(),
            config,
            broker: Arc::new(Mutex::new(Broker::default())),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Broker>, QueueError> {
        lock(&self.broker)
    }

    fn declare(&self, families: &[&str]) -> Result<(), QueueError> {
        for family in families {
            validate_name("model family", family)?;
        }
        let names = &self.names;
        let mut broker = self.lock()?;
        broker.exchanges_declared = true;
        broker
            .queues
            .entry(names.dead_letter_queue())
            .or_insert_with(|| MemoryQueue::new(None, None, false));
        broker
            .queues
            .entry(names.events_queue())
            .or_insert_with(|| MemoryQueue::new(None, None, false));
        for family in families {
            let limit = Some(u64::from(self.config.delivery_limit));
            let dead_letter_queue = Some(names.dead_letter_queue());
            broker
                .queues
                .entry(names.task_queue(family))
                .or_insert_with(|| MemoryQueue::new(limit, dead_letter_queue, false));
            broker.task_routes.insert((*family).to_string());
        }
        Ok(())
    }

    fn delete(&self, families: &[&str]) -> Result<(), QueueError> {
        let names = &self.names;
        let mut broker = self.lock()?;
        for family in families {
            broker.delete_queue(&names.task_queue(family));
            broker.task_routes.remove(*family);
        }
        broker.delete_queue(&names.dead_letter_queue());
        broker.delete_queue(&names.events_queue());
        broker.exchanges_declared = false;
        broker.task_routes.clear();
        // Deleting the control exchange unbinds the subscribers; their queues stay until they go.
        broker.control_subscribers.clear();
        Ok(())
    }

    fn publish_to_queue(
        &self,
        queue: &str,
        messages: Vec<OutgoingMessage>,
    ) -> Result<(), QueueError> {
        let mut broker = self.lock()?;
        if !broker.queues.contains_key(queue) {
            return Err(unroutable(queue.to_string()));
        }
        for message in messages {
            broker.enqueue(queue, StoredMessage::new(message));
        }
        Ok(())
    }

    fn publish_tasks(
        &self,
        family: &str,
        messages: Vec<OutgoingMessage>,
    ) -> Result<(), QueueError> {
        validate_name("model family", family)?;
        let destination = format!("{}/{family}", self.names.tasks_exchange());
        let queue = self.names.task_queue(family);
        let mut broker = self.lock()?;
        if !broker.exchanges_declared {
            return Err(QueueError::Publish {
                destination,
                reason: "404 NOT_FOUND: no exchange".to_string(),
            });
        }
        if !broker.task_routes.contains(family) || !broker.queues.contains_key(&queue) {
            return Err(unroutable(destination));
        }
        for message in messages {
            broker.enqueue(&queue, StoredMessage::new(message));
        }
        Ok(())
    }

    fn subscribe(
        &self,
        queue: &str,
        prefetch: u16,
        create: Option<bool>,
    ) -> Result<Consumer, QueueError> {
        let mut broker = self.lock()?;
        broker.next_id += 1;
        let consumer_id = broker.next_id;
        let queue = match create {
            // Control subscriber: a fresh server-named queue bound to the control fanout.
            Some(true) => {
                let name = format!("{}.amq.gen-{consumer_id}", self.names.control_exchange());
                broker
                    .queues
                    .insert(name.clone(), MemoryQueue::new(None, None, true));
                broker.control_subscribers.insert(name.clone());
                name
            }
            // Reply queue: declared on first consume, shared by later consumers of the same worker.
            Some(false) => {
                broker
                    .queues
                    .entry(queue.to_string())
                    .or_insert_with(|| MemoryQueue::new(None, None, true));
                queue.to_string()
            }
            None => queue.to_string(),
        };
        let Some(target) = broker.queues.get_mut(&queue) else {
            return Err(QueueError::Topology {
                reason: format!("queue {queue} is not declared"),
            });
        };
        target.consumers.insert(
            consumer_id,
            ConsumerSlot {
                prefetch,
                in_flight: 0,
            },
        );
        debug!(queue = %queue, prefetch, consumer_id, "consuming");
        Ok(Consumer {
            queue: queue.clone(),
            inner: ConsumerInner::InProcess(InProcessConsumer {
                broker: self.broker.clone(),
                queue,
                consumer_id,
                config: self.config.clone(),
            }),
        })
    }
}

fn lock(broker: &Mutex<Broker>) -> Result<MutexGuard<'_, Broker>, QueueError> {
    broker.lock().map_err(|_| QueueError::Connection {
        retryable: false,
        message: "in-process queue state poisoned by a panic".to_string(),
    })
}

impl TaskQueue for InProcessQueue {
    fn declare_topology<'a>(
        &'a self,
        families: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        async move { self.declare(families) }.boxed()
    }

    fn delete_topology<'a>(
        &'a self,
        families: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        async move { self.delete(families) }.boxed()
    }

    fn publish_task<'a>(
        &'a self,
        family: &'a str,
        message: OutgoingMessage,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        async move { self.publish_tasks(family, vec![message]) }.boxed()
    }

    fn publish_task_batch<'a>(
        &'a self,
        family: &'a str,
        messages: Vec<OutgoingMessage>,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        async move { self.publish_tasks(family, messages) }.boxed()
    }

    fn consume_tasks<'a>(
        &'a self,
        family: &'a str,
        prefetch: u16,
    ) -> BoxFuture<'a, Result<Consumer, QueueError>> {
        async move {
            validate_name("model family", family)?;
            self.subscribe(&self.names.task_queue(family), prefetch, None)
        }
        .boxed()
    }

    fn consume_dead_letters(&self, prefetch: u16) -> BoxFuture<'_, Result<Consumer, QueueError>> {
        async move { self.subscribe(&self.names.dead_letter_queue(), prefetch, None) }.boxed()
    }

    fn publish_event(&self, message: OutgoingMessage) -> BoxFuture<'_, Result<(), QueueError>> {
        async move { self.publish_to_queue(&self.names.events_queue(), vec![message]) }.boxed()
    }

    fn consume_events(&self, prefetch: u16) -> BoxFuture<'_, Result<Consumer, QueueError>> {
        async move { self.subscribe(&self.names.events_queue(), prefetch, None) }.boxed()
    }

    fn reply_to_worker<'a>(
        &'a self,
        worker_id: &'a str,
        message: OutgoingMessage,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        async move {
            validate_name("worker id", worker_id)?;
            self.publish_to_queue(&self.names.reply_queue(worker_id), vec![message])
        }
        .boxed()
    }

    fn consume_replies<'a>(
        &'a self,
        worker_id: &'a str,
    ) -> BoxFuture<'a, Result<Consumer, QueueError>> {
        async move {
            validate_name("worker id", worker_id)?;
            self.subscribe(
                &self.names.reply_queue(worker_id),
                self.config.prefetch,
                Some(false),
            )
        }
        .boxed()
    }

    fn broadcast_control(&self, message: OutgoingMessage) -> BoxFuture<'_, Result<(), QueueError>> {
        async move {
            let mut broker = self.lock()?;
            if !broker.exchanges_declared {
                return Err(QueueError::Publish {
                    destination: self.names.control_exchange(),
                    reason: "404 NOT_FOUND: no exchange".to_string(),
                });
            }
            let subscribers: Vec<String> = broker.control_subscribers.iter().cloned().collect();
            for subscriber in subscribers {
                broker.enqueue(&subscriber, StoredMessage::new(message.clone()));
            }
            Ok(())
        }
        .boxed()
    }

    fn queue_stats<'a>(
        &'a self,
        families: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<crate::QueueStats>, QueueError>> {
        async move {
            let wanted = self.names.durable_queues(families);
            let broker = self.lock()?;
            Ok(wanted
                .into_iter()
                .filter_map(|queue| {
                    let q = broker.queues.get(&queue)?;
                    Some(crate::QueueStats {
                        messages: (q.ready.len() + q.returned.len()) as u64,
                        consumers: q.consumers.len() as u64,
                        queue,
                    })
                })
                .collect())
        }
        .boxed()
    }

    fn consume_control(&self) -> BoxFuture<'_, Result<Consumer, QueueError>> {
        async move {
            if !self.lock()?.exchanges_declared {
                return Err(QueueError::Topology {
                    reason: format!("exchange {} is not declared", self.names.control_exchange()),
                });
            }
            self.subscribe("", self.config.prefetch, Some(true))
        }
        .boxed()
    }
}

/// A consumer of one in-memory queue; dropping it returns its unacknowledged deliveries.
#[derive(Debug)]
pub(crate) struct InProcessConsumer {
    broker: Arc<Mutex<Broker>>,
    queue: String,
    consumer_id: u64,
    config: QueueConfig,
}

impl InProcessConsumer {
    pub(crate) async fn next(&mut self) -> Result<Option<Delivery>, QueueError> {
        loop {
            let take = lock(&self.broker)?.take(&self.queue, self.consumer_id);
            let notify = match take {
                Take::Cancelled => return Ok(None),
                Take::Delivery(tag, message) => return Ok(Some(self.delivery(tag, message))),
                Take::Wait(notify) => notify,
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Check again now that the wake-up is registered: nothing is missed in between.
            match lock(&self.broker)?.take(&self.queue, self.consumer_id) {
                Take::Cancelled => return Ok(None),
                Take::Delivery(tag, message) => return Ok(Some(self.delivery(tag, message))),
                Take::Wait(_) => {}
            }
            notified.await;
        }
    }

    fn delivery(&self, tag: u64, stored: StoredMessage) -> Delivery {
        Delivery {
            payload: stored.message.payload,
            headers: stored.message.headers,
            message_id: Some(stored.message.message_id),
            correlation_id: stored.message.correlation_id,
            redelivered: stored.redelivered,
            delivery_count: stored.delivery_count,
            dead_letter: stored.dead_letter,
            acker: Acker {
                inner: AckerInner::InProcess(InProcessAcker {
                    broker: self.broker.clone(),
                    queue: self.queue.clone(),
                    consumer_id: self.consumer_id,
                    tag,
                }),
                received_at: Instant::now(),
                broker_consumer_timeout: self.config.broker_consumer_timeout,
                queue: self.queue.clone(),
            },
        }
    }
}

impl Drop for InProcessConsumer {
    fn drop(&mut self) {
        if let Ok(mut broker) = lock(&self.broker) {
            broker.remove_consumer(&self.queue, self.consumer_id);
        }
    }
}

/// Settles one in-memory delivery; fails with [`QueueError::Closed`] once its consumer is gone.
#[derive(Debug)]
pub(crate) struct InProcessAcker {
    broker: Arc<Mutex<Broker>>,
    queue: String,
    consumer_id: u64,
    tag: u64,
}

impl InProcessAcker {
    pub(crate) fn settle(&self, settlement: Settlement) -> Result<(), QueueError> {
        lock(&self.broker)?.settle(&self.queue, self.consumer_id, self.tag, settlement)
    }
}
