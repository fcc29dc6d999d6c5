-- append_tokens: a worker adds an output chunk to a request's token stream and its
-- progress; the first chunk ever sets first_token_at. Keeps the record's `run` field
-- (_lib.lua's run_row).
--
-- KEYS[1]  req:{id}           the request record
-- KEYS[2]  stream:{id}        the token stream
-- ARGV[1]  worker             the worker that must hold the request
-- ARGV[2]  now                time of the chunk
-- ARGV[3]  text               decoded text of the chunk ('' if none)
-- ARGV[4]  token_ids          JSON array of the chunk's token ids
-- ARGV[5]  num_tokens         tokens in the chunk (>= 0)
-- ARGV[6]  stream_maxlen      approximate MAXLEN of the stream
--
-- Returns {'ok', num_generated, entry_id}; {'not_found'}; {'lost', state, worker}
-- (nothing written); {'invalid', field, problem} when progress would pass max_tokens.

local rec = redis.call('HMGET', KEYS[1], 'state', 'worker', 'num_generated', 'max_tokens',
  'first_token_at', 'arrival_at', 'started_at')
if not rec[1] then return {'not_found'} end
if rec[1] ~= 'running' or rec[2] ~= ARGV[1] then return {'lost', rec[1], rec[2] or ''} end
local num_generated = tonumber(rec[3]) + tonumber(ARGV[5])
if num_generated > tonumber(rec[4]) then
  return {'invalid', 'num_tokens', 'progress ' .. num_generated .. ' would pass max_tokens=' .. rec[4]}
end
local first_token_at = rec[5]
if not first_token_at or first_token_at == '' then first_token_at = ARGV[2] end
redis.call('HSET', KEYS[1], 'num_generated', num_generated, 'first_token_at', first_token_at,
  'run', run_row(rec[6], tostring(num_generated), rec[7], first_token_at))
local entry = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'text', ARGV[3],
  'token_ids', ARGV[4], 'num_generated', num_generated, 'at', ARGV[2])
return {'ok', num_generated, entry}
