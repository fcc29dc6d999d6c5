-- set_policy_state: save a scheduling policy's state (the leader, every few seconds).
--
-- KEYS[1]  scheduler:state  hash: policy name -> its state (JSON)
-- KEYS[2]  scheduler:fence  the fencing token of the current leader's term
-- ARGV[1]  policy           the policy's name (the hash field)
-- ARGV[2]  state            the state, JSON text
-- ARGV[3]  fence            the writer's fencing token ("0": no check)
--
-- Returns 1. Returns -1 and writes nothing when ``fence`` is not the current fencing
-- token: a scheduler that lost its lease cannot overwrite what the new leader saved.

local fence = ARGV[3]
if fence ~= '0' and redis.call('GET', KEYS[2]) ~= fence then
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
