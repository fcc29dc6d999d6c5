-- claim: a worker takes these named queued requests (a scheduler Pull decision)
-- and holds them under a lease. Ids that are not queued are skipped.
--
-- KEYS[1]  running:{worker}   ids running on the worker
-- KEYS[2]  leases             lease sorted set (score = lease_expires_at)
-- KEYS[3]  workers            set of known workers
-- ARGV[1]  prefix             key prefix (req:{id}, group:{group}, groups, queue:log
--                             are derived)
-- ARGV[2]  worker             worker id
-- ARGV[3]  now                started_at of the claimed requests
-- ARGV[4]  lease_expires_at   their lease expiry
-- ARGV[5 ..]                  request ids, in the order to return them
--
-- Returns the claimed records as JSON objects of strings.

local prefix, worker, now, lease = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local claimed = {}
redis.call('SADD', KEYS[3], worker)
for i = 5, #ARGV do
  local id = ARGV[i]
  local rk = req_key(prefix, id)
  local rec = redis.call('HMGET', rk, 'state', 'group', 'arrival_at', 'num_generated',
    'first_token_at')
  if rec[1] == 'queued' then
    remove_from_group(prefix, id, rec[2])
    redis.call('HSET', rk, 'state', 'running', 'worker', worker, 'started_at', now,
      'lease_expires_at', lease, 'run', run_row(rec[3], rec[4], now, rec[5]))
    redis.call('HINCRBY', rk, 'num_pulls', 1)
    redis.call('ZADD', KEYS[2], lease, id)
    redis.call('SADD', KEYS[1], id)
    claimed[#claimed + 1] = record_json(rk)
  end
end
return claimed
