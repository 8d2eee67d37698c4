//! `Consumer`: a stream of deliveries from one queue, the same type for every backend.

use crate::error::QueueError;
use crate::in_process::InProcessConsumer;
use crate::message::Delivery;
use crate::rabbit::RabbitConsumer;

/// Deliveries from one queue, with manual acknowledgement and a prefetch limit.
///
/// Dropping (or [`Consumer::close`]-ing) a consumer gives every delivery it still holds
/// unacknowledged back to the queue, to be redelivered with `redelivered = true` and a higher
/// `delivery_count`: that is what happens when a worker crashes. Keep the consumer alive until
/// its deliveries are settled.
#[derive(Debug)]
pub struct Consumer {
    pub(crate) queue: String,
    pub(crate) inner: ConsumerInner,
}

#[derive(Debug)]
pub(crate) enum ConsumerInner {
    Rabbit(RabbitConsumer),
    InProcess(InProcessConsumer),
}

impl Consumer {
    /// Full name of the queue this consumer reads.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next delivery; waits while the queue is empty or the prefetch limit is reached.
    /// `Ok(None)`: the consumer was cancelled (its queue was deleted). A delivery whose headers
    /// cannot be decoded is dead-lettered and reported as [`QueueError::Decode`]; the consumer
    /// stays usable.
    pub async fn next(&mut self) -> Result<Option<Delivery>, QueueError> {
        match &mut self.inner {
            ConsumerInner::Rabbit(consumer) => consumer.next().await,
            ConsumerInner::InProcess(consumer) => consumer.next().await,
        }
    }

    /// Stops consuming; unacknowledged deliveries go back to the queue.
    pub async fn close(self) -> Result<(), QueueError> {
        match self.inner {
            ConsumerInner::Rabbit(consumer) => consumer.close().await,
            ConsumerInner::InProcess(consumer) => {
                drop(consumer);
                Ok(())
            }
        }
    }
}
