-- finish (ack): a worker records the final state of a request it holds and drops the lease.
--
-- KEYS[1]  req:{id}           the request record
-- ARGV[1]  prefix             key prefix (running:{worker}, leases, stream:{id} derived)
-- ARGV[2]  id                 request id
-- ARGV[3]  worker             the worker that must hold the request
-- ARGV[4]  state              finished | failed | cancelled
-- ARGV[5]  num_generated      final progress, or '' to keep the stored value
-- ARGV[6]  reason             error text ('' when finished)
-- ARGV[7]  now                finished_at
-- ARGV[8]  record_ttl_s       TTL of the record from now (0 = keep forever)
-- ARGV[9]  stream_ttl_s       TTL of the token stream from now (0 = keep forever)
-- ARGV[10] stream_maxlen      approximate MAXLEN of the token stream
--
-- Returns {'ok'}; {'not_found'}; {'lost', state, worker} when the request is not
-- running on this worker (lease expired and requeued, or never pulled) — nothing is
-- written then; {'invalid', field, problem} for a bad num_generated.

local prefix, id, worker = ARGV[1], ARGV[2], ARGV[3]
local rec = redis.call('HMGET', KEYS[1], 'state', 'worker', 'max_tokens')
if not rec[1] then return {'not_found'} end
if rec[1] ~= 'running' or rec[2] ~= worker then return {'lost', rec[1], rec[2] or ''} end
if ARGV[5] ~= '' then
  local n = tonumber(ARGV[5])
  if n > tonumber(rec[3]) then
    return {'invalid', 'num_generated', 'must be <= max_tokens=' .. rec[3] .. ', got ' .. ARGV[5]}
  end
  redis.call('HSET', KEYS[1], 'num_generated', ARGV[5])
end
release_lease(prefix, id, worker)
finish_record(prefix, id, ARGV[4], ARGV[6],
  {now = ARGV[7], record_ttl_s = ARGV[8], stream_ttl_s = ARGV[9], stream_maxlen = ARGV[10]})
return {'ok'}
