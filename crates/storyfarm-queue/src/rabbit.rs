//! RabbitMQ backend (lapin): `RabbitQueue`, the confirm-mode `Publisher`, consumers, ackers and
//! the one function that translates lapin errors into `QueueError`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, ChannelStatus, Confirmation, Connection, ConnectionProperties,
    ExchangeKind,
};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::config::{validate_name, QueueConfig, TopologyNames};
use crate::consumer::{Consumer, ConsumerInner};
use crate::error::QueueError;
use crate::message::{
    Acker, AckerInner, DeadLetter, DeadLetterReason, Delivery, Headers, OutgoingMessage, Settlement,
};
use crate::TaskQueue;

const DELIVERY_MODE_PERSISTENT: u8 = 2;
const REPLY_SUCCESS: u16 = 200;

/// The operation a lapin error interrupted; decides which [`QueueError`] kind it becomes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Operation<'a> {
    Connect,
    Declare,
    Publish { destination: &'a str },
    Consume { queue: &'a str },
    Settle,
    Close,
}

/// The one translation of lapin errors into [`QueueError`].
pub(crate) fn translate_lapin_error(error: lapin::Error, operation: Operation<'_>) -> QueueError {
    use lapin::ErrorKind;
    let message = error.to_string();
    debug!(error = %message, ?operation, "amqp operation failed");
    if let Operation::Settle = operation {
        // Whatever ended the channel, the broker requeues the delivery.
        return QueueError::Closed {
            operation: "settle",
        };
    }
    match error.kind() {
        ErrorKind::ProtocolError(amqp_error) => match (amqp_error.kind(), operation) {
            (AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED), Operation::Connect) => {
                QueueError::Connection {
                    retryable: false,
                    message,
                }
            }
            (AMQPErrorKind::Soft(_), Operation::Declare) => {
                QueueError::Topology { reason: message }
            }
            (AMQPErrorKind::Soft(_), Operation::Publish { destination }) => QueueError::Publish {
                destination: destination.to_string(),
                reason: message,
            },
            (AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND), Operation::Consume { queue }) => {
                QueueError::Topology {
                    reason: format!("queue {queue} is not declared: {message}"),
                }
            }
            _ => QueueError::Connection {
                retryable: true,
                message,
            },
        },
        ErrorKind::IOError(_)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::ChannelsLimitReached => QueueError::Connection {
            retryable: true,
            message,
        },
        _ => QueueError::Connection {
            retryable: false,
            message,
        },
    }
}

fn short_string(what: &'static str, value: &str) -> Result<ShortString, QueueError> {
    ShortString::try_new(value).map_err(|_| QueueError::InvalidName {
        what,
        value: value.to_string(),
        reason: "must be at most 255 bytes",
    })
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Publishes persistent, mandatory messages on a confirm-mode channel and waits for the broker's
/// confirms. Unroutable messages (returned) and nacks are errors. The channel is reopened when the
/// broker closed it (e.g. after publishing to a missing exchange).
#[derive(Debug)]
pub struct Publisher {
    connection: Arc<Connection>,
    channel: Mutex<Option<Channel>>,
}

impl Publisher {
    /// A publisher on its own channel of `connection`.
    pub async fn new(connection: Arc<Connection>) -> Result<Self, QueueError> {
        let publisher = Self {
            connection,
            channel: Mutex::new(None),
        };
        publisher.channel().await?;
        Ok(publisher)
    }

    async fn channel(&self) -> Result<Channel, QueueError> {
        let mut guard = self.channel.lock().await;
        if let Some(channel) = guard.as_ref() {
            if channel.status().connected() {
                return Ok(channel.clone());
            }
            debug!(
                channel_id = channel.id(),
                "publisher channel closed, reopening"
            );
        }
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|error| translate_lapin_error(error, Operation::Connect))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|error| translate_lapin_error(error, Operation::Connect))?;
        *guard = Some(channel.clone());
        Ok(channel)
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &OutgoingMessage,
    ) -> Result<(), QueueError> {
        self.publish_batch(exchange, routing_key, std::slice::from_ref(message))
            .await
    }

    /// Publishes all messages back to back (pipelined), then waits for every confirm. Returns the
    /// first failure after all confirms have arrived.
    pub async fn publish_batch(
        &self,
        exchange: &str,
        routing_key: &str,
        messages: &[OutgoingMessage],
    ) -> Result<(), QueueError> {
        self.publish_messages(exchange, routing_key, messages, true)
            .await
    }

    /// Like [`Publisher::publish`], but an unroutable message is dropped by the broker instead of
    /// failing (broadcasts to no subscriber).
    pub async fn publish_not_mandatory(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &OutgoingMessage,
    ) -> Result<(), QueueError> {
        self.publish_messages(exchange, routing_key, std::slice::from_ref(message), false)
            .await
    }

    async fn publish_messages(
        &self,
        exchange: &str,
        routing_key: &str,
        messages: &[OutgoingMessage],
        mandatory: bool,
    ) -> Result<(), QueueError> {
        let destination = if exchange.is_empty() {
            routing_key.to_string()
        } else {
            format!("{exchange}/{routing_key}")
        };
        let channel = self.channel().await?;
        let exchange_name = short_string("exchange", exchange)?;
        let routing_key_name = short_string("routing key", routing_key)?;
        let options = BasicPublishOptions {
            mandatory,
            ..BasicPublishOptions::default()
        };
        let mut confirms = Vec::with_capacity(messages.len());
        for message in messages {
            let properties = properties_of(message)?;
            let confirm = channel
                .basic_publish(
                    exchange_name.clone(),
                    routing_key_name.clone(),
                    options,
                    &message.payload,
                    properties,
                )
                .await
                .map_err(|error| {
                    translate_lapin_error(
                        error,
                        Operation::Publish {
                            destination: &destination,
                        },
                    )
                })?;
            confirms.push((message.message_id.as_str(), confirm));
        }
        let mut first_error = None;
        let outcomes = futures::future::join_all(
            confirms
                .into_iter()
                .map(|(message_id, confirm)| confirm.map(move |outcome| (message_id, outcome))),
        )
        .await;
        for (message_id, outcome) in outcomes {
            let result = match outcome {
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Ack(Some(returned))) => Err(QueueError::Publish {
                    destination: destination.clone(),
                    reason: format!(
                        "message {message_id} unroutable: {} {}",
                        returned.reply_code, returned.reply_text
                    ),
                }),
                Ok(Confirmation::Nack(_)) => Err(QueueError::Nacked {
                    destination: destination.clone(),
                    message_id: message_id.to_string(),
                }),
                Ok(Confirmation::NotRequested) => Err(QueueError::Publish {
                    destination: destination.clone(),
                    reason: "publisher confirms are not enabled on the channel".to_string(),
                }),
                Err(error) => Err(translate_lapin_error(
                    error,
                    Operation::Publish {
                        destination: &destination,
                    },
                )),
            };
            if let Err(error) = result {
                warn!(destination = %destination, message_id, error = %error, "publish not confirmed");
                first_error.get_or_insert(error);
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

fn properties_of(message: &OutgoingMessage) -> Result<BasicProperties, QueueError> {
    let mut headers = FieldTable::default();
    for (key, value) in &message.headers {
        headers.insert(short_string("header name", key)?, text(value));
    }
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or(0);
    let mut properties = BasicProperties::default()
        .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
        .with_message_id(short_string("message id", &message.message_id)?)
        .with_timestamp(timestamp)
        .with_headers(headers);
    if let Some(correlation_id) = &message.correlation_id {
        properties =
            properties.with_correlation_id(short_string("correlation id", correlation_id)?);
    }
    Ok(properties)
}

/// The RabbitMQ task queue: one connection, one publisher channel, one channel per consumer.
#[derive(Debug)]
pub struct RabbitQueue {
    config: QueueConfig,
    names: TopologyNames,
    connection: Arc<Connection>,
    publisher: Publisher,
}

impl RabbitQueue {
    /// Connects to `config.url`.
    pub async fn connect(config: QueueConfig) -> Result<Self, QueueError> {
        validate_name("namespace", &config.namespace)?;
        if config.task_may_exceed_consumer_timeout() {
            warn!(
                max_task_duration_s = config.max_task_duration.map(|duration| duration.as_secs()),
                consumer_timeout_s = config.broker_consumer_timeout.as_secs(),
                "tasks may outlive the broker's consumer_timeout; raise consumer_timeout in rabbitmq.conf or they will be redelivered mid-run"
            );
        }
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(config.connection_name.as_str()));
        let connection = Connection::connect(&config.url, properties)
            .await
            .map_err(|error| translate_lapin_error(error, Operation::Connect))?;
        let connection = Arc::new(connection);
        let publisher = Publisher::new(connection.clone()).await?;
        info!(namespace = %config.namespace, connection_name = %config.connection_name, "connected to amqp broker");
        Ok(Self {
            names: config.names(),
            config,
            connection,
            publisher,
        })
    }

    /// The configuration this queue was built from.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// The confirm-mode publisher (e.g. for publishing to other exchanges).
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Closes the connection; consumers stop and their unacknowledged deliveries are requeued.
    pub async fn close(&self) -> Result<(), QueueError> {
        self.connection
            .close(REPLY_SUCCESS, ShortString::from("closing"))
            .await
            .map_err(|error| translate_lapin_error(error, Operation::Close))
    }

    async fn open_channel(&self, operation: Operation<'_>) -> Result<Channel, QueueError> {
        self.connection
            .create_channel()
            .await
            .map_err(|error| translate_lapin_error(error, operation))
    }

    fn task_queue_arguments(&self) -> FieldTable {
        let mut arguments = quorum_arguments();
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.config.delivery_limit)),
        );
        arguments.insert(
            "x-dead-letter-exchange".into(),
            text(&self.names.dead_letter_exchange()),
        );
        arguments.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        arguments.insert("x-overflow".into(), text("reject-publish"));
        arguments
    }

    async fn declare(&self, families: &[&str]) -> Result<(), QueueError> {
        for family in families {
            validate_name("model family", family)?;
        }
        let channel = self.open_channel(Operation::Declare).await?;
        let declare_error = |error| translate_lapin_error(error, Operation::Declare);
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let names = &self.names;

        for (exchange, kind) in [
            (names.tasks_exchange(), ExchangeKind::Direct),
            (names.dead_letter_exchange(), ExchangeKind::Fanout),
            (names.control_exchange(), ExchangeKind::Fanout),
        ] {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    kind,
                    durable_exchange,
                    FieldTable::default(),
                )
                .await
                .map_err(declare_error)?;
        }
        channel
            .queue_declare(
                names.dead_letter_queue().into(),
                durable_queue,
                quorum_arguments(),
            )
            .await
            .map_err(declare_error)?;
        channel
            .queue_bind(
                names.dead_letter_queue().into(),
                names.dead_letter_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(declare_error)?;
        channel
            .queue_declare(
                names.events_queue().into(),
                durable_queue,
                quorum_arguments(),
            )
            .await
            .map_err(declare_error)?;
        for family in families {
            let queue = names.task_queue(family);
            channel
                .queue_declare(
                    queue.as_str().into(),
                    durable_queue,
                    self.task_queue_arguments(),
                )
                .await
                .map_err(declare_error)?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    names.tasks_exchange().into(),
                    (*family).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(declare_error)?;
        }
        let _ = channel.close(REPLY_SUCCESS, "declared".into()).await;
        info!(namespace = %names.namespace(), families = ?families, "task queue topology declared");
        Ok(())
    }

    async fn delete(&self, families: &[&str]) -> Result<(), QueueError> {
        for family in families {
            validate_name("model family", family)?;
        }
        let channel = self.open_channel(Operation::Declare).await?;
        let declare_error = |error| translate_lapin_error(error, Operation::Declare);
        let names = &self.names;
        let mut queues: Vec<String> = families
            .iter()
            .map(|family| names.task_queue(family))
            .collect();
        queues.push(names.dead_letter_queue());
        queues.push(names.events_queue());
        for queue in queues {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(declare_error)?;
        }
        for exchange in [
            names.tasks_exchange(),
            names.dead_letter_exchange(),
            names.control_exchange(),
        ] {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .map_err(declare_error)?;
        }
        let _ = channel.close(REPLY_SUCCESS, "deleted".into()).await;
        info!(namespace = %names.namespace(), families = ?families, "task queue topology deleted");
        Ok(())
    }

    /// Opens a channel with `prefetch`, optionally declares an exclusive auto-delete queue
    /// (`Some("")` = server-named) bound to `bind_to`, and starts consuming.
    async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        exclusive: bool,
        bind_to: Option<String>,
    ) -> Result<Consumer, QueueError> {
        let consume_error = |error| translate_lapin_error(error, Operation::Consume { queue });
        let channel = self.open_channel(Operation::Consume { queue }).await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(consume_error)?;
        let mut queue_name = short_string("queue", queue)?;
        if exclusive {
            let options = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            };
            let declared = channel
                .queue_declare(queue_name, options, FieldTable::default())
                .await
                .map_err(|error| translate_lapin_error(error, Operation::Declare))?;
            queue_name = declared.name().clone();
        }
        if let Some(exchange) = bind_to {
            channel
                .queue_bind(
                    queue_name.clone(),
                    exchange.into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|error| translate_lapin_error(error, Operation::Declare))?;
        }
        let consumer_tag = format!("{}-{}", self.config.connection_name, uuid::Uuid::new_v4());
        let consumer = channel
            .basic_consume(
                queue_name.clone(),
                consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(consume_error)?;
        let queue = queue_name.to_string();
        debug!(queue = %queue, prefetch, consumer_tag = %consumer_tag, "consuming");
        Ok(Consumer {
            queue: queue.clone(),
            inner: ConsumerInner::Rabbit(RabbitConsumer {
                channel,
                consumer,
                queue,
                broker_consumer_timeout: self.config.broker_consumer_timeout,
                closed: false,
            }),
        })
    }
}

fn quorum_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), text("quorum"));
    arguments
}

impl TaskQueue for RabbitQueue {
    fn declare_topology<'a>(
        &'a self,
        families: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        self.declare(families).boxed()
    }

    fn delete_topology<'a>(
        &'a self,
        families: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        self.delete(families).boxed()
    }

    fn publish_task<'a>(
        &'a self,
        family: &'a str,
        message: OutgoingMessage,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        async move {
            validate_name("model family", family)?;
            self.publisher
                .publish(&self.names.tasks_exchange(), family, &message)
                .await
        }
        .boxed()
    }

    fn publish_task_batch<'a>(
        &'a self,
        family: &'a str,
        messages: Vec<OutgoingMessage>,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        async move {
            validate_name("model family", family)?;
            self.publisher
                .publish_batch(&self.names.tasks_exchange(), family, &messages)
                .await
        }
        .boxed()
    }

    fn consume_tasks<'a>(
        &'a self,
        family: &'a str,
        prefetch: u16,
    ) -> BoxFuture<'a, Result<Consumer, QueueError>> {
        async move {
            validate_name("model family", family)?;
            self.consume(&self.names.task_queue(family), prefetch, false, None)
                .await
        }
        .boxed()
    }

    fn consume_dead_letters(&self, prefetch: u16) -> BoxFuture<'_, Result<Consumer, QueueError>> {
        async move {
            self.consume(&self.names.dead_letter_queue(), prefetch, false, None)
                .await
        }
        .boxed()
    }

    fn publish_event(&self, message: OutgoingMessage) -> BoxFuture<'_, Result<(), QueueError>> {
        async move {
            self.publisher
                .publish("", &self.names.events_queue(), &message)
                .await
        }
        .boxed()
    }

    fn consume_events(&self, prefetch: u16) -> BoxFuture<'_, Result<Consumer, QueueError>> {
        async move {
            self.consume(&self.names.events_queue(), prefetch, false, None)
                .await
        }
        .boxed()
    }

    fn reply_to_worker<'a>(
        &'a self,
        worker_id: &'a str,
        message: OutgoingMessage,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        async move {
            validate_name("worker id", worker_id)?;
            self.publisher
                .publish("", &self.names.reply_queue(worker_id), &message)
                .await
        }
        .boxed()
    }

    fn consume_replies<'a>(
        &'a self,
        worker_id: &'a str,
    ) -> BoxFuture<'a, Result<Consumer, QueueError>> {
        async move {
            validate_name("worker id", worker_id)?;
            self.consume(
                &self.names.reply_queue(worker_id),
                self.config.prefetch,
                true,
                None,
            )
            .await
        }
        .boxed()
    }

    fn broadcast_control(&self, message: OutgoingMessage) -> BoxFuture<'_, Result<(), QueueError>> {
        async move {
            // A broadcast with no subscribers is fine: not mandatory.
            self.publisher
                .publish_not_mandatory(&self.names.control_exchange(), "", &message)
                .await
        }
        .boxed()
    }

    fn queue_stats<'a>(
        &'a self,
        families: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<crate::QueueStats>, QueueError>> {
        async move {
            let wanted = self.names.durable_queues(families);
            let mut stats = Vec::with_capacity(wanted.len());
            for queue in wanted {
                // A passive declare of a missing queue closes its channel: one channel each.
                let channel = self.open_channel(Operation::Declare).await?;
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                match channel
                    .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                    .await
                {
                    Ok(declared) => {
                        stats.push(crate::QueueStats {
                            queue,
                            messages: u64::from(declared.message_count()),
                            consumers: u64::from(declared.consumer_count()),
                        });
                        let _ = channel.close(REPLY_SUCCESS, "counted".into()).await;
                    }
                    Err(error) if self.connection.status().connected() => {
                        debug!(queue = %queue, error = %error, "queue not counted (not declared)");
                    }
                    Err(error) => return Err(translate_lapin_error(error, Operation::Declare)),
                }
            }
            Ok(stats)
        }
        .boxed()
    }

    fn consume_control(&self) -> BoxFuture<'_, Result<Consumer, QueueError>> {
        async move {
            self.consume(
                "",
                self.config.prefetch,
                true,
                Some(self.names.control_exchange()),
            )
            .await
        }
        .boxed()
    }
}

/// A consumer on its own channel; dropping it closes the channel, which requeues its deliveries.
#[derive(Debug)]
pub(crate) struct RabbitConsumer {
    channel: Channel,
    consumer: lapin::Consumer,
    queue: String,
    broker_consumer_timeout: Duration,
    closed: bool,
}

impl RabbitConsumer {
    pub(crate) async fn next(&mut self) -> Result<Option<Delivery>, QueueError> {
        let Some(delivery) = self.consumer.next().await else {
            return Ok(None);
        };
        let delivery = delivery.map_err(|error| {
            translate_lapin_error(error, Operation::Consume { queue: &self.queue })
        })?;
        let received_at = Instant::now();
        let decoded = decode_headers(&self.queue, delivery.properties.headers().as_ref());
        let (headers, delivery_count, dead_letter) = match decoded {
            Ok(decoded) => decoded,
            Err(error) => {
                warn!(queue = %self.queue, error = %error, "undecodable delivery dead-lettered");
                let _ = delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await;
                return Err(error);
            }
        };
        Ok(Some(Delivery {
            payload: Bytes::from(delivery.data),
            headers,
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(ToString::to_string),
            correlation_id: delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(ToString::to_string),
            redelivered: delivery.redelivered,
            delivery_count,
            dead_letter,
            acker: Acker {
                inner: AckerInner::Rabbit(RabbitAcker {
                    acker: delivery.acker,
                    channel_status: self.channel.status().clone(),
                }),
                received_at,
                broker_consumer_timeout: self.broker_consumer_timeout,
                queue: self.queue.clone(),
            },
        }))
    }

    pub(crate) async fn close(mut self) -> Result<(), QueueError> {
        self.closed = true;
        if !self.channel.status().connected() {
            return Ok(());
        }
        self.channel
            .close(REPLY_SUCCESS, "consumer closed".into())
            .await
            .map_err(|error| translate_lapin_error(error, Operation::Close))
    }
}

impl Drop for RabbitConsumer {
    fn drop(&mut self) {
        if self.closed || !self.channel.status().connected() {
            return;
        }
        // lapin also closes a channel when its last handle goes, but ackers may still hold it:
        // close it now so the broker requeues the unacknowledged deliveries, like a crash.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let channel = self.channel.clone();
        let queue = self.queue.clone();
        runtime.spawn(async move {
            if let Err(error) = channel.close(REPLY_SUCCESS, "consumer dropped".into()).await {
                debug!(queue = %queue, error = %error, "closing a dropped consumer's channel failed");
            }
        });
    }
}

/// Settles a RabbitMQ delivery on the channel it came from.
#[derive(Debug)]
pub(crate) struct RabbitAcker {
    acker: lapin::Acker,
    channel_status: ChannelStatus,
}

impl RabbitAcker {
    pub(crate) async fn settle(&self, settlement: Settlement) -> Result<(), QueueError> {
        let closed = QueueError::Closed {
            operation: "settle",
        };
        if !self.channel_status.connected() || !self.acker.usable() {
            return Err(closed);
        }
        let result = match settlement {
            Settlement::Ack => self.acker.ack(BasicAckOptions::default()).await,
            Settlement::Nack { requeue } => {
                self.acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue,
                    })
                    .await
            }
            Settlement::Reject => {
                self.acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await
            }
        };
        match result {
            Ok(true) => Ok(()),
            // The acker was poisoned meanwhile: its channel ended (it cannot have been used before,
            // `Acker` settles once).
            Ok(false) => Err(closed),
            Err(error) => Err(translate_lapin_error(error, Operation::Settle)),
        }
    }
}

/// Splits broker headers into application headers, `x-delivery-count` and `x-death`.
fn decode_headers(
    queue: &str,
    table: Option<&FieldTable>,
) -> Result<(Headers, u64, Option<DeadLetter>), QueueError> {
    let mut headers = Headers::new();
    let mut delivery_count = 0;
    let mut dead_letter = None;
    let Some(table) = table else {
        return Ok((headers, delivery_count, dead_letter));
    };
    let decode_error = |reason: String| QueueError::Decode {
        queue: queue.to_string(),
        reason,
    };
    for (key, value) in table.inner() {
        let key = key.as_str();
        match key {
            "x-delivery-count" => {
                delivery_count = integer(value).ok_or_else(|| {
                    decode_error(format!(
                        "header x-delivery-count is not an integer: {value:?}"
                    ))
                })?;
            }
            "x-death" => dead_letter = Some(decode_x_death(value).map_err(decode_error)?),
            _ if key.starts_with("x-first-death-") || key.starts_with("x-last-death-") => {}
            _ => {
                let text = match value {
                    AMQPValue::LongString(text) => String::from_utf8(text.as_bytes().to_vec())
                        .map_err(|_| decode_error(format!("header {key} is not UTF-8")))?,
                    AMQPValue::ShortString(text) => text.to_string(),
                    AMQPValue::Boolean(flag) => flag.to_string(),
                    other => match integer(other) {
                        Some(number) => number.to_string(),
                        None => {
                            return Err(decode_error(format!(
                                "header {key} is not text: {other:?}"
                            )))
                        }
                    },
                };
                headers.insert(key.to_string(), text);
            }
        }
    }
    Ok((headers, delivery_count, dead_letter))
}

fn integer(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::ShortShortUInt(number) => Some(u64::from(*number)),
        AMQPValue::ShortUInt(number) => Some(u64::from(*number)),
        AMQPValue::LongUInt(number) => Some(u64::from(*number)),
        AMQPValue::ShortShortInt(number) => u64::try_from(*number).ok(),
        AMQPValue::ShortInt(number) => u64::try_from(*number).ok(),
        AMQPValue::LongInt(number) => u64::try_from(*number).ok(),
        AMQPValue::LongLongInt(number) => u64::try_from(*number).ok(),
        AMQPValue::Timestamp(number) => Some(*number),
        _ => None,
    }
}

/// The most recent `x-death` entry (RabbitMQ keeps the newest first).
fn decode_x_death(value: &AMQPValue) -> Result<DeadLetter, String> {
    let AMQPValue::FieldArray(entries) = value else {
        return Err(format!("header x-death is not an array: {value:?}"));
    };
    let Some(AMQPValue::FieldTable(entry)) = entries.as_slice().first() else {
        return Err("header x-death has no table entry".to_string());
    };
    let field_text = |name: &str| match entry.inner().get(name) {
        Some(AMQPValue::LongString(text)) => {
            Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
        }
        Some(AMQPValue::ShortString(text)) => Some(text.to_string()),
        _ => None,
    };
    let reason = field_text("reason").ok_or("header x-death has no reason")?;
    let queue = field_text("queue").ok_or("header x-death has no queue")?;
    let count = entry.inner().get("count").and_then(integer).unwrap_or(1);
    Ok(DeadLetter {
        reason: DeadLetterReason::from_broker_text(&reason),
        queue,
        count,
    })
}
