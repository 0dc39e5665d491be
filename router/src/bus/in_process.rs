//! The single-node bus: one bounded tokio channel per partition, records
//! moved as they are (no encoding: a deliver frame stays one shared
//! buffer). One process is the only producer and the only consumer, so
//! its "group" is fixed: the k-th member to join owns partition k for its
//! whole life. There is nobody to hand a partition to, so a member told to
//! leave keeps consuming until the topic ends: this node stopped producing
//! (every sender is gone, including one a publisher still holds) and the
//! queue is empty. Nothing accepted is left behind.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Bus, BusError, BusRecord, Consumed, GroupMember, Partition, Polled, Topic};

/// One partition: a bounded channel.
struct Lane<R> {
    sender: RwLock<Option<mpsc::Sender<R>>>,
    receiver: Mutex<Option<mpsc::Receiver<R>>>,
}

impl<R> Lane<R> {
    fn new(capacity: usize) -> Self {
        let (sender, receiver) = mpsc::channel(capacity);
        Self {
            sender: RwLock::new(Some(sender)),
            receiver: Mutex::new(Some(receiver)),
        }
    }

    fn sender(&self) -> Option<mpsc::Sender<R>> {
        self.sender
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// A topic's partitions.
struct Lanes<R> {
    lanes: Vec<Lane<R>>,
}

/// The single-node bus.
pub struct InProcessBus {
    /// Topic name -> its `Arc<Lanes<R>>` (typed by the record of the
    /// topic's first declaration).
    topics: RwLock<HashMap<String, Arc<dyn Any + Send + Sync>>>,
    capacity: usize,
}

impl std::fmt::Debug for InProcessBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessBus")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl InProcessBus {
    /// A bus whose partitions each queue up to `capacity` records.
    pub fn new(capacity: usize) -> Self {
        Self {
            topics: RwLock::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    fn lanes<R: BusRecord>(&self, topic: &Topic<R>) -> Result<Arc<Lanes<R>>, BusError> {
        self.topics
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(topic.name())
            .cloned()
            .and_then(|lanes| lanes.downcast::<Lanes<R>>().ok())
            .ok_or_else(|| BusError::Unknown(topic.name().to_string()))
    }

    fn lane_sender<R: BusRecord>(
        &self,
        topic: &Topic<R>,
        key: u64,
    ) -> Result<mpsc::Sender<R>, BusError> {
        let lanes = self.lanes(topic)?;
        let lane = &lanes.lanes[(key % lanes.lanes.len() as u64) as usize];
        lane.sender()
            .ok_or_else(|| BusError::Closed(topic.name().to_string()))
    }
}

#[async_trait]
impl<R: BusRecord> Bus<R> for InProcessBus {
    fn declare(&self, topic: &Topic<R>) -> Result<(), BusError> {
        let mut topics = self
            .topics
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let lanes = topics.entry(topic.name().to_string()).or_insert_with(|| {
            Arc::new(Lanes::<R> {
                lanes: (0..topic.partitions())
                    .map(|_| Lane::new(self.capacity))
                    .collect(),
            })
        });
        if lanes.clone().downcast::<Lanes<R>>().is_err() {
            return Err(BusError::Unknown(format!(
                "{} is declared with another record type",
                topic.name()
            )));
        }
        Ok(())
    }

    fn try_publish(&self, topic: &Topic<R>, key: u64, record: R) -> Result<(), BusError> {
        self.lane_sender(topic, key)?
            .try_send(record)
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => BusError::Full(topic.name().to_string()),
                mpsc::error::TrySendError::Closed(_) => BusError::Closed(topic.name().to_string()),
            })
    }

    async fn publish(&self, topic: &Topic<R>, key: u64, record: R) -> Result<(), BusError> {
        let sender = self.lane_sender(topic, key)?;
        sender
            .send(record)
            .await
            .map_err(|_| BusError::Closed(topic.name().to_string()))
    }

    fn stop_producing(&self, topic: &Topic<R>) {
        if let Ok(lanes) = self.lanes(topic) {
            for lane in &lanes.lanes {
                lane.sender
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take();
            }
        }
    }

    fn join(
        &self,
        topic: &Topic<R>,
        _group: &str,
        member: &str,
        _leave: CancellationToken,
    ) -> Result<Box<dyn GroupMember<R>>, BusError> {
        let lanes = self.lanes(topic)?;
        // The first lane nobody took: one process, one member per partition.
        let (partition, receiver) = lanes
            .lanes
            .iter()
            .enumerate()
            .find_map(|(partition, lane)| {
                lane.receiver
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take()
                    .map(|receiver| (partition as Partition, receiver))
            })
            .ok_or_else(|| {
                BusError::Unknown(format!("{}: no partition left for {member}", topic.name()))
            })?;
        Ok(Box::new(ChannelMember {
            partition,
            receiver,
            assigned: false,
        }))
    }

    fn lag(&self, topic: &Topic<R>, _group: &str) -> u64 {
        self.lanes(topic)
            .map(|lanes| {
                lanes
                    .lanes
                    .iter()
                    .filter_map(Lane::sender)
                    .map(|sender| self.capacity.saturating_sub(sender.capacity()) as u64)
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// A member owning one partition's channel.
struct ChannelMember<R> {
    partition: Partition,
    receiver: mpsc::Receiver<R>,
    assigned: bool,
}

impl<R> ChannelMember<R> {
    fn consumed(&self, records: Vec<R>) -> Polled<R> {
        Polled::Records(
            records
                .into_iter()
                .map(|record| Consumed {
                    partition: self.partition,
                    record,
                })
                .collect(),
        )
    }
}

#[async_trait]
impl<R: BusRecord> GroupMember<R> for ChannelMember<R> {
    async fn poll(&mut self, max: usize) -> Polled<R> {
        if !self.assigned {
            self.assigned = true;
            return Polled::Assigned(vec![self.partition]);
        }
        let max = max.max(1);
        let mut records = Vec::with_capacity(max.min(1024));
        // Zero records only once every sender is gone and the queue is empty.
        self.receiver.recv_many(&mut records, max).await;
        if records.is_empty() {
            Polled::Left
        } else {
            self.consumed(records)
        }
    }

    async fn commit(&mut self) -> Result<(), BusError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use pingme_storage::ConversationId;

    use super::*;
    use crate::bus::conversation_key;
    use crate::records::{DeadLetterRecord, PushEvent, letter};

    fn records<R>(polled: Polled<R>) -> Vec<R> {
        match polled {
            Polled::Records(records) => records.into_iter().map(|c| c.record).collect(),
            _ => panic!("expected records"),
        }
    }

    #[tokio::test]
    async fn a_key_keeps_its_order_and_stopping_production_drains_then_ends() {
        let bus = InProcessBus::new(4);
        let topic = Topic::new("im-dlq", 3);
        bus.declare(&topic).unwrap();
        let key = conversation_key(&ConversationId::Group(5));
        let mut members: Vec<_> = (0..3)
            .map(|i| {
                bus.join(&topic, "dlq", &format!("m{i}"), CancellationToken::new())
                    .unwrap()
            })
            .collect();
        // A partition has one consumer.
        assert!(
            Bus::<DeadLetterRecord>::join(&bus, &topic, "dlq", "m3", CancellationToken::new())
                .is_err()
        );
        let member = &mut members[topic.partition_of(key) as usize];
        assert_eq!(
            member.poll(10).await,
            Polled::Assigned(vec![topic.partition_of(key)])
        );
        for attempts in 0..4 {
            bus.try_publish(&topic, key, letter(attempts)).unwrap();
        }
        assert_eq!(
            bus.try_publish(&topic, key, letter(9)),
            Err(BusError::Full("im-dlq".into()))
        );
        assert_eq!(Bus::<DeadLetterRecord>::lag(&bus, &topic, "dlq"), 4);
        Bus::<DeadLetterRecord>::stop_producing(&bus, &topic);
        assert_eq!(
            bus.publish(&topic, key, letter(9)).await,
            Err(BusError::Closed("im-dlq".into()))
        );
        assert_eq!(
            records(member.poll(10).await),
            (0..4).map(letter).collect::<Vec<_>>()
        );
        assert_eq!(member.poll(10).await, Polled::Left);
    }

    #[tokio::test]
    async fn a_member_told_to_leave_consumes_until_this_node_stopped_producing() {
        let bus = InProcessBus::new(8);
        let topic = Topic::new("im-dlq", 1);
        bus.declare(&topic).unwrap();
        let leave = CancellationToken::new();
        let mut member = bus.join(&topic, "dlq", "m0", leave.clone()).unwrap();
        assert_eq!(member.poll(10).await, Polled::Assigned(vec![0]));
        bus.try_publish(&topic, 1, letter(1)).unwrap();
        leave.cancel();
        assert_eq!(records(member.poll(10).await), vec![letter(1)]);
        // Told to leave, but this node still produces: a record published
        // now (a racing ingress call) is not left behind.
        let polled = tokio::spawn(async move {
            let more = records(member.poll(10).await);
            (more, member.poll(10).await)
        });
        bus.try_publish(&topic, 1, letter(2)).unwrap();
        Bus::<DeadLetterRecord>::stop_producing(&bus, &topic);
        assert_eq!(polled.await.unwrap(), (vec![letter(2)], Polled::Left));
    }

    #[test]
    fn a_topic_carries_one_record_type() {
        let bus = InProcessBus::new(1);
        bus.declare(&Topic::<DeadLetterRecord>::new("t", 1))
            .unwrap();
        assert!(matches!(
            bus.declare(&Topic::<PushEvent>::new("t", 1)),
            Err(BusError::Unknown(_))
        ));
    }
}
